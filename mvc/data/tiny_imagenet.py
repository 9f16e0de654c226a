"""Tiny ImageNet (200 ImageNet classes at 64x64) in the layout of its public release, `tiny-imagenet-200/`:

    wnids.txt                                  the 200 class ids (wnids), one a line: the class order
    words.txt                                  wnid<TAB>synonyms, comma-separated (all of WordNet's nouns)
    train/<wnid>/images/<wnid>_<i>.JPEG        500 per class (train/<wnid>/<wnid>_boxes.txt is not read)
    val/images/val_<i>.JPEG                    10,000 images, labelled by
    val/val_annotations.txt                    file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1
    test/images/                               unlabelled: never read

Split "test" is the labelled val set (the official test has no labels); the labelled subset is drawn
from train. A class's name is the first synonym of its words.txt line (a name two classes share: the next
unused synonym, else the wnid in brackets).
"""

from __future__ import annotations

import logging
from pathlib import Path

from mvc.core.utils import MVCError
from mvc.data.dataset import FileSource, ImageDataset, register_dataset
from mvc.data.images import image_files, short_list, verify_image

log = logging.getLogger(__name__)

FOLDER = "tiny-imagenet-200"
README = "datasets/README.md"


def _lines(path: Path) -> list[str]:
    """The lines of a text file (MVCError naming it when it is not UTF-8 or cannot be read)."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise MVCError(f"{path} is not UTF-8 text; download the dataset again") from None
    except OSError as e:
        raise MVCError(f"cannot read {path} ({e.strerror or e})") from None


def read_wnids(base: Path) -> list[str]:
    """The class ids of `base/wnids.txt`, in its order."""
    path = base / "wnids.txt"
    if not path.is_file():
        raise MVCError(f"tiny_imagenet not found: expected {path} (unpack tiny-imagenet-200.zip under the data root; "
                       f"see {README})")
    wnids = [w.strip() for w in _lines(path) if w.strip()]
    if not wnids:
        raise MVCError(f"{path} lists no class; download the dataset again")
    dup = sorted({w for w in wnids if wnids.count(w) > 1})
    if dup:
        raise MVCError(f"{path} lists class(es) {short_list(dup)} more than once; download the dataset again")
    return wnids


def _clean(name: str) -> str:
    return " ".join(name.replace("_", " ").split())


def class_names(base: Path, wnids: list[str]) -> list[str]:
    """One name per wnid from `base/words.txt`: its first synonym, cleaned, unique among the classes."""
    path = base / "words.txt"
    if not path.is_file():
        raise MVCError(f"tiny_imagenet: {path} not found (it names the classes of wnids.txt; see {README})")
    wanted = set(wnids)
    synonyms: dict[str, list[str]] = {}
    for line in _lines(path):
        wnid, _, words = line.partition("\t")
        wnid = wnid.strip()
        if wnid in wanted and wnid not in synonyms:
            synonyms[wnid] = [s for s in (_clean(w) for w in words.split(",")) if s]
    missing = [w for w in wnids if not synonyms.get(w)]
    if missing:
        raise MVCError(f"{path} has no name for class(es) {short_list(missing)} of wnids.txt; download the dataset again")
    names = {w: synonyms[w][0] for w in wnids}
    firsts = list(names.values())
    for w in wnids:
        if firsts.count(names[w]) > 1:
            taken = set(names.values())
            names[w] = next((s for s in synonyms[w][1:] if s not in taken), f"{names[w]} ({w})")
    return [names[w] for w in wnids]


def _scan_train(base: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    """train/<wnid>/images/*, sorted by name; bad files and classes without images each get one warning."""
    paths: list[Path] = []
    labels: list[int] = []
    bad: list[str] = []
    empty: list[str] = []
    for label, wnid in enumerate(wnids):
        folder = base / "train" / wnid / "images"
        files = image_files(folder, bad) if folder.is_dir() else []
        paths += files
        labels += [label] * len(files)
        if not files:
            empty.append(wnid)
    if bad:
        log.warning(f"tiny_imagenet: skipping {len(bad)} unreadable or non-image file(s): {short_list(bad)}")
    if empty and len(empty) < len(wnids):
        log.warning(f"tiny_imagenet: class(es) without images under {base / 'train'} (they keep their index): "
                    f"{short_list(empty)}")
    return paths, labels


def _read_val(base: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    """val/images/* labelled by val/val_annotations.txt, in its order."""
    ann = base / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise MVCError(f"tiny_imagenet: {ann} not found (it labels the val images, the test split; see {README})")
    index = {w: i for i, w in enumerate(wnids)}
    images = base / "val" / "images"
    paths: list[Path] = []
    labels: list[int] = []
    seen: set[str] = set()
    bad: list[str] = []
    for n, line in enumerate(_lines(ann), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or not fields[0].strip() or not fields[1].strip():
            raise MVCError(f"{ann}, line {n}: expected 'file<TAB>wnid<TAB>box', got {line[:80]!r}")
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in index:
            raise MVCError(f"{ann}, line {n}: class {wnid!r} of {name} is not in wnids.txt; download the dataset again")
        if name in seen:
            raise MVCError(f"{ann}, line {n}: {name} is labelled twice; download the dataset again")
        if Path(name).name != name or name in (".", ".."):
            raise MVCError(f"{ann}, line {n}: {name!r} is not a file name inside {images}")
        seen.add(name)
        p = images / name
        if not p.exists():
            raise MVCError(f"{ann}, line {n}: image {p} does not exist; download the dataset again")
        reason = verify_image(p)
        if reason is not None:
            bad.append(f"{p} ({reason})")
            continue
        paths.append(p)
        labels.append(index[wnid])
    if bad:
        log.warning(f"tiny_imagenet: skipping {len(bad)} unreadable or non-image file(s): {short_list(bad)}")
    if images.is_dir():
        extra = sorted(p.name for p in images.iterdir() if not p.name.startswith(".") and p.name not in seen)
        if extra:
            log.warning(f"tiny_imagenet: ignoring {len(extra)} image(s) of {images} without a label in "
                        f"val_annotations.txt: {short_list(extra)}")
    return paths, labels


@register_dataset("tiny_imagenet")
def tiny_imagenet(root: Path, split: str) -> ImageDataset:
    """Tiny ImageNet under `<root>/tiny-imagenet-200/`: "train" is its train split, "test" its labelled val split."""
    base = root / FOLDER
    wnids = read_wnids(base)
    classes = class_names(base, wnids)
    paths, labels = _scan_train(base, wnids) if split == "train" else _read_val(base, wnids)
    if not paths:
        where = base / "train" / "<wnid>" / "images" if split == "train" else base / "val" / "images"
        raise MVCError(f"tiny_imagenet: no usable images under {where} (see {README})")
    ids = [p.relative_to(base).as_posix() for p in paths]
    return ImageDataset("tiny_imagenet", split, classes, labels, ids, FileSource(paths))


tiny_imagenet.test_description = "Tiny ImageNet's labelled val split (its official test split has no labels)"
