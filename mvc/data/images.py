"""Image files: open any mode as 8-bit RGB, verify headers cheaply, scan class folders.

Every file-based dataset goes through `scan_class_folders` (index time: cheap header check, bad
files skipped with ONE warning line naming them) and `load_rgb` (access time: full decode; a file
that passed the header check but still fails raises an MVCError naming it).
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mvc.core.utils import MVCError

log = logging.getLogger(__name__)

# Extensions we try to open; anything else in a class folder is reported as "not an image".
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}


#################################################################################
#                              Mode conversion                                  #
#################################################################################

def _to_uint8(arr: np.ndarray, full_scale: float | None) -> np.ndarray:
    """Scale an integer/float array to uint8: by `full_scale` when given, else by its own range."""
    arr = arr.astype(np.float64)
    if full_scale is None:
        hi = float(arr.max()) if arr.size else 0.0
        # values already in 0..255 stay as they are; 16-bit ranges divide by 257; anything else min-max
        if hi <= 1.0 and arr.min() >= 0 and arr.dtype.kind == "f":
            full_scale = 1.0
        elif hi <= 255:
            full_scale = 255.0
        elif hi <= 65535:
            full_scale = 65535.0
        else:
            lo = float(arr.min())
            arr, full_scale = arr - lo, max(hi - lo, 1.0)
    return np.clip(np.rint(arr * (255.0 / full_scale)), 0, 255).astype(np.uint8)


def upright(im):
    """`im` turned and mirrored as its EXIF orientation says (the image itself when it says nothing)."""
    from PIL import ImageOps

    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # an unreadable EXIF block says nothing about orientation
        return im
    return ImageOps.exif_transpose(im) if orientation not in (1, None) else im


def to_rgb(im):
    """Convert a PIL image of any mode to 8-bit RGB (transparency composited on white, 16-bit scaled), upright.

    A camera's JPEG stores the sensor's pixels and, in EXIF, the turn that shows them upright: it is applied
    here, where every image of training, generation and `predict` passes, so each stage sees what the user sees."""
    from PIL import Image

    im = upright(im)
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P":
        # a palette with a transparent entry becomes RGBA first, so it can be composited below
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
        if mode == "RGB":
            return im
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I;16"):
        # 16-bit grayscale (e.g. medical PNGs): full 0..65535 range -> 0..255
        arr = np.asarray(im).astype(np.uint16)
        return Image.fromarray(_to_uint8(arr, 65535.0), "L").convert("RGB")
    if mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(im), None), "L").convert("RGB")
    # L, 1, CMYK, YCbCr, LAB, HSV, ...: PIL knows the conversion
    return im.convert("RGB")


def load_rgb(path: str | os.PathLike):
    """Open and fully decode `path` as an RGB PIL image, or raise an MVCError naming the file."""
    from PIL import Image

    if not Path(path).is_file():  # a FIFO would block, a device never end
        raise MVCError(f"cannot read image {str(path)!r}: not a regular file")
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except MVCError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise MVCError(f"cannot read image {path} ({type(e).__name__}: {e}); delete or replace the file") from None


def verify_image(path: Path) -> str | None:
    """Cheap header check of one file; returns None when it looks fine, else the reason."""
    from PIL import Image

    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return "not an image"
    if not path.is_file():  # a FIFO, device or socket: never opened (reading a FIFO blocks)
        return "not a regular file"
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with Image.open(path) as im:
            im.verify()  # parses headers/chunks (PNG CRCs) without decoding the pixels
    except Exception as e:
        return type(e).__name__
    return None


#################################################################################
#                              Folder scanning                                  #
#################################################################################

def _list_dir(path: Path) -> list[os.DirEntry]:
    """Entries of `path` sorted by name, hidden files left out; OSError propagates."""
    with os.scandir(path) as it:
        return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)


def entry_kind(entry: os.DirEntry | Path, within: Path | None = None) -> str:
    """'dir', 'file', 'loop' or 'other' for one folder entry, never an OSError.

    'loop': a symbolic link that loops (a file pointing at itself) or a folder link that leads back to
    `within` or one of its ancestors (a class folder pointing at its parent): following it never ends."""
    try:
        is_dir = entry.is_dir()
        if is_dir and within is not None and entry.is_symlink():
            target, here = Path(os.path.realpath(entry)), Path(os.path.realpath(within))
            if target == here or target in here.parents:
                return "loop"
        return "dir" if is_dir else "file" if entry.is_file() else "other"
    except OSError as e:
        return "loop" if e.errno == errno.ELOOP else "other"


_WARNED_LOOPS: set[tuple[str, tuple[str, ...]]] = set()


def list_class_dirs(split_dir: Path, exclude: tuple[str, ...] = ()) -> list[str]:
    """Sorted names of the class sub-folders of `split_dir` (MVCError if it cannot be read); links that loop
    are skipped with one warning."""
    if not split_dir.is_dir():
        raise MVCError(f"folder not found: {split_dir} (see datasets/README.md for the expected layout)")
    try:
        entries = _list_dir(split_dir)
    except OSError as e:
        raise MVCError(f"cannot read folder {split_dir}: {e.strerror or e}") from None
    kinds = {e.name: entry_kind(e, split_dir) for e in entries if e.name not in exclude}
    loops = [n for n, k in kinds.items() if k == "loop"]
    if loops and (str(split_dir), tuple(loops)) not in _WARNED_LOOPS:  # once, though the train split is listed twice
        _WARNED_LOOPS.add((str(split_dir), tuple(loops)))
        log.warning(f"{split_dir}: skipping symbolic link(s) that loop: {short_list(list(map(repr, loops)))}")
    return [n for n, k in kinds.items() if k == "dir"]


def printable_name(name: str) -> str:
    """A folder name as text every consumer accepts: bytes that are not UTF-8 (a Latin-1 `caf\\xe9`, which Python
    holds as surrogate escapes) are shown escaped, `caf\\xe9`, so tokenizers, fonts, JSON and reports never meet a
    surrogate. UTF-8 names come back unchanged."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def short_list(items: list[str], n: int = 5) -> str:
    """`a, b, c and 7 more` for warning lines that must stay one line."""
    head = ", ".join(items[:n])
    return head + (f" and {len(items) - n} more" if len(items) > n else "")


def image_files(folder: Path, bad: list[str]) -> list[Path]:
    """The images directly in `folder`, sorted by name (hidden files and sub-folders left out); a file that is not
    a readable image, or a link that loops, goes to `bad` as "path (reason)" instead. Listing errors propagate."""
    files: list[Path] = []
    for e in _list_dir(folder):
        kind = entry_kind(e, folder)
        if kind == "dir":
            continue  # nested folders are not part of the class
        p = Path(e.path)
        reason = "a symbolic link that loops" if kind == "loop" else verify_image(p)
        if reason is not None:
            bad.append(f"{p} ({reason})")
            continue
        files.append(p)
    return files


def scan_class_folders(split_dir: Path, classes: list[str], id_root: Path,
                       on_unknown: str = "error",
                       exclude: tuple[str, ...] = ()) -> tuple[list[Path], list[int], list[str]]:
    """Index `split_dir/<class>/*` for the given class list: (paths, labels, ids relative to `id_root`).

    Bad files (zero-byte, corrupt header, not an image), unreadable class folders and classes
    without a usable image are each reported in one warning line; sub-folders naming a class
    that is not in `classes` raise an MVCError (`on_unknown="error"`) or are skipped with a warning.
    """
    present = list_class_dirs(split_dir, exclude)
    unknown = [c for c in present if c not in classes]
    if unknown and on_unknown == "error":
        raise MVCError(f"{split_dir}: class folder(s) {short_list(list(map(repr, unknown)))} are not among the training "
                       "classes; add them to the training split or remove them")
    if unknown:
        log.warning(f"{split_dir}: skipping class folder(s) not among the training classes: "
                    f"{short_list(list(map(repr, unknown)))}")
    paths: list[Path] = []
    labels: list[int] = []
    bad: list[str] = []
    unreadable: list[str] = []
    empty: list[str] = []
    # disable=None: a bar on a terminal only, silent in logs and tests
    bar = tqdm(classes, desc=f"checking {split_dir.name}", unit="class", disable=None, leave=False)
    for label, name in enumerate(bar):
        cdir = split_dir / name
        if name not in present:
            empty.append(name)
            continue
        try:
            files = image_files(cdir, bad)
        except OSError as e:
            unreadable.append(f"{cdir} ({e.strerror or e})")
            continue
        paths += files
        labels += [label] * len(files)
        if not files:
            empty.append(name)
    if bad:
        log.warning(f"skipping {len(bad)} unreadable or non-image file(s): {short_list(bad)}")
    if unreadable:
        log.warning(f"skipping {len(unreadable)} unreadable folder(s): {short_list(unreadable)}")
    if empty and len(empty) < len(classes):
        log.warning(f"{split_dir}: class(es) without usable images (they keep their index): "
                    f"{short_list(list(map(repr, empty)))}")
    ids = [p.relative_to(id_root).as_posix() for p in paths]
    return paths, labels, ids
