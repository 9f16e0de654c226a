"""The registered datasets: each reads its usual on-disk layout into an `ImageDataset`.

Layouts (relative to the data root; see datasets/README.md):
  cifar10        cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}
  cifar100       cifar-100-python/{train,test,meta}
  caltech101     caltech101/101_ObjectCategories/<class>/*.jpg  (seeded stratified train/test split)
  brain_tumor    brain_tumor/{Training,Testing}/<class>/*
  tiny_imagenet  tiny-imagenet-200/{wnids.txt,words.txt,train/<wnid>/images/*,val/...}  (mvc/data/tiny_imagenet.py)
  fashion_mnist  fashion_mnist/*-idx?-ubyte[.gz] (or FashionMNIST/raw/, or the Debian package's folder)
  imagefolder    <root>/{train,test[,val]}/<class>/*   (root is the folder itself)
"""

from __future__ import annotations

import codecs
import gzip
import logging
import pickle
from pathlib import Path

import numpy as np

from mvc.core.utils import MVCError
from mvc.data.dataset import ArraySource, FileSource, ImageDataset, draw_per_class, register_dataset
from mvc.data.images import list_class_dirs, printable_name, scan_class_folders

log = logging.getLogger(__name__)

README = "datasets/README.md"


#################################################################################
#                                 CIFAR                                         #
#################################################################################

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickle only plain containers and numpy arrays: the CIFAR files hold nothing else."""

    def find_class(self, module: str, name: str):
        try:
            from numpy._core import multiarray
        except ImportError:  # numpy < 2
            from numpy.core import multiarray
        allowed = {("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
                   ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
                   ("numpy.core.multiarray", "scalar"): multiarray.scalar,
                   ("numpy._core.multiarray", "scalar"): multiarray.scalar,
                   ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                   # protocol-2 pickles written by Python 3 encode bytes through this pure function
                   ("_codecs", "encode"): codecs.encode}
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return allowed[(module, name)]


def _load_cifar_pickle(path: Path) -> dict:
    """Read one CIFAR python-format pickle (written by Python 2) into a dict with str keys."""
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise
    except Exception as e:
        raise MVCError(f"{path} is not a readable CIFAR batch ({type(e).__name__}: {e}); download it again") from None
    if not isinstance(d, dict):
        raise MVCError(f"{path} is not a CIFAR batch (expected a dict); download it again")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar(root: Path, split: str, name: str, folder: str, files: dict[str, list[str]], meta: str,
           label_key: str, names_key: str) -> ImageDataset:
    """Shared CIFAR-10/100 reader: batches of (N, 3072) uint8 rows -> (N, 32, 32, 3) images."""
    base = root / folder
    needed = files[split] + [meta]
    missing = [f for f in needed if not (base / f).is_file()]
    if missing:
        raise MVCError(f"{name} not found: expected {base}/{missing[0]} (python version of the dataset; see {README})")
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in _load_cifar_pickle(base / meta)[names_key]]
    images, labels = [], []
    for f in files[split]:
        d = _load_cifar_pickle(base / f)
        try:
            data = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            lab = np.asarray(d[label_key], dtype=np.int64)
        except (KeyError, ValueError) as e:
            raise MVCError(f"{base / f} is not a {name} batch ({type(e).__name__}: {e}); download it again") from None
        if len(lab) != len(data):
            raise MVCError(f"{base / f}: {len(data)} images but {len(lab)} labels; download it again")
        images.append(data.transpose(0, 2, 3, 1))  # (N, 3, 32, 32) -> (N, 32, 32, 3)
        labels.append(lab)
    images_arr = np.ascontiguousarray(np.concatenate(images))
    targets = np.concatenate(labels)
    if len(targets) and (targets.min() < 0 or targets.max() >= len(classes)):
        raise MVCError(f"{base}: labels outside 0..{len(classes) - 1}; download the dataset again")
    ids = [f"{split}/{i:05d}" for i in range(len(targets))]
    return ImageDataset(name, split, classes, targets, ids, ArraySource(images_arr))


@register_dataset("cifar10")
def cifar10(root: Path, split: str) -> ImageDataset:
    """CIFAR-10 in torchvision's python format under `<root>/cifar-10-batches-py/`."""
    files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    return _cifar(root, split, "cifar10", "cifar-10-batches-py", files, "batches.meta", "labels", "label_names")


@register_dataset("cifar100")
def cifar100(root: Path, split: str) -> ImageDataset:
    """CIFAR-100 (fine labels) in torchvision's python format under `<root>/cifar-100-python/`."""
    files = {"train": ["train"], "test": ["test"]}
    return _cifar(root, split, "cifar100", "cifar-100-python", files, "meta", "fine_labels", "fine_label_names")


#################################################################################
#                              Image folders                                    #
#################################################################################

def _folder_dataset(name: str, split: str, split_dir: Path, class_dir: Path, id_root: Path,
                    exclude: tuple[str, ...] = ()) -> ImageDataset:
    """A dataset whose classes are the sub-folders of `class_dir` (the training split's folder)."""
    classes = list_class_dirs(class_dir, exclude)
    if not classes:
        raise MVCError(f"no class folders in {class_dir} (expected {class_dir}/<class>/<image>; see {README})")
    paths, labels, ids = scan_class_folders(split_dir, classes, id_root, exclude=exclude)
    if not paths:
        raise MVCError(f"no usable images under {split_dir} (expected {split_dir}/<class>/<image>)")
    # a folder named in another encoding than UTF-8 is read from its real name and shown escaped everywhere else
    shown = [printable_name(c) for c in classes]
    if len(set(shown)) < len(shown):
        raise MVCError(f"{class_dir}: two class folders have the same name once escaped "
                       f"({', '.join(repr(c) for c in shown if shown.count(c) > 1)}); rename one")
    return ImageDataset(name, split, shown, labels, ids, FileSource(paths))


@register_dataset("brain_tumor")
def brain_tumor(root: Path, split: str) -> ImageDataset:
    """Kaggle "Brain Tumor MRI Dataset": `<root>/brain_tumor/{Training,Testing}/<class>/*`."""
    base = root / "brain_tumor"
    folder = {"train": "Training", "test": "Testing"}[split]
    if not (base / "Training").is_dir():
        raise MVCError(f"brain_tumor not found: expected {base}/Training/<class>/ (see {README})")
    ds = _folder_dataset("brain_tumor", split, base / folder, base / "Training", base)
    expected = {"glioma", "meningioma", "notumor", "pituitary"}
    if set(ds.classes) != expected:
        log.warning(f"brain_tumor: classes {ds.classes} differ from the Kaggle set {sorted(expected)}")
    return ds


CALTECH_EXCLUDE = ("BACKGROUND_Google",)


@register_dataset("caltech101")
def caltech101(root: Path, split: str, test_fraction: float = 0.2, split_seed: int = 0) -> ImageDataset:
    """Caltech101 (torchvision layout, no background class) with a seeded stratified split.

    Each class holds out round(test_fraction * n) images (at least 1 when it has 2 or more) as
    "test"; the draw depends only on (split_seed, class index) and the sorted file names.
    """
    if not 0 < test_fraction < 1:
        raise MVCError(f"caltech101 test_fraction must be in (0, 1), got {test_fraction}")
    base = root / "caltech101" / "101_ObjectCategories"
    if not base.is_dir():
        raise MVCError(f"caltech101 not found: expected {base}/<class>/*.jpg (see {README})")
    full = _folder_dataset("caltech101", split, base, base, base, exclude=CALTECH_EXCLUDE)
    test_pos, train_pos = draw_per_class(full.targets, len(full.classes),
                                         lambda n: max(1, int(round(test_fraction * n))) if n >= 2 else 0,
                                         split_seed, role="test_split")
    return full.subset(test_pos if split == "test" else train_pos)


#################################################################################
#                               Fashion-MNIST                                   #
#################################################################################

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# Debian's `dataset-fashion-mnist` package; a module constant so tests can point it elsewhere.
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_IDX_PREFIX = {"train": "train", "test": "t10k"}


def _idx_file(folder: Path, stem: str) -> Path | None:
    """`folder/stem` or `folder/stem.gz`, whichever exists."""
    for p in (folder / stem, folder / f"{stem}.gz"):
        if p.is_file():
            return p
    return None


def read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Read an idx file (raw or gzip) of unsigned bytes: images (N, H, W) or labels (N,)."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise MVCError(f"cannot read {path} ({type(e).__name__}: {e}); download it again") from None
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        raise MVCError(f"{path} is not an idx file with magic {magic}; download it again")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) != header + int(np.prod(dims)):
        raise MVCError(f"{path} is truncated or padded ({len(raw)} bytes for dims {dims}); download it again")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _fashion_dirs(root: Path) -> list[Path]:
    """Folders searched, in order, for the Fashion-MNIST idx files."""
    return [root / "fashion_mnist", root / "FashionMNIST" / "raw", SYSTEM_FASHION_MNIST]


def _fashion_download(root: Path) -> Path:
    """Download through torchvision into `<root>/FashionMNIST/raw` (only where there is network)."""
    try:
        import torchvision

        log.info(f"Fashion-MNIST not found locally; downloading it to {root / 'FashionMNIST'}")
        torchvision.datasets.FashionMNIST(str(root), train=True, download=True)
        torchvision.datasets.FashionMNIST(str(root), train=False, download=True)
    except Exception as e:
        raise MVCError(f"Fashion-MNIST not found in {', '.join(map(str, _fashion_dirs(root)))} and the download "
                       f"failed ({type(e).__name__}); put the idx files in {root / 'fashion_mnist'} "
                       f"(see {README})") from None
    return root / "FashionMNIST" / "raw"


@register_dataset("fashion_mnist")
def fashion_mnist(root: Path, split: str, download: bool = True) -> ImageDataset:
    """Fashion-MNIST from idx files (gz or raw), kept in memory as (N, 28, 28) uint8."""
    prefix = _IDX_PREFIX[split]
    img_stem, lab_stem = f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"
    found = None
    for d in _fashion_dirs(root):
        img, lab = _idx_file(d, img_stem), _idx_file(d, lab_stem)
        if img and lab:
            found = (img, lab)
            break
    if found is None:
        if not download:
            raise MVCError(f"Fashion-MNIST {split} files ({img_stem}[.gz], {lab_stem}[.gz]) not found in "
                           f"{', '.join(map(str, _fashion_dirs(root)))} (see {README})")
        d = _fashion_download(root)
        found = (_idx_file(d, img_stem), _idx_file(d, lab_stem))
        if not all(found):
            raise MVCError(f"Fashion-MNIST download did not produce {d / img_stem}; see {README}")
    images = read_idx(found[0], 2051, 3)
    labels = read_idx(found[1], 2049, 1).astype(np.int64)
    if len(images) != len(labels):
        raise MVCError(f"{found[0]} has {len(images)} images but {found[1]} has {len(labels)} labels")
    if len(labels) and labels.max() >= len(FASHION_CLASSES):
        raise MVCError(f"{found[1]}: labels outside 0..9; download it again")
    ids = [f"{split}/{i:05d}" for i in range(len(labels))]
    return ImageDataset("fashion_mnist", split, FASHION_CLASSES, labels, ids, ArraySource(images))


#################################################################################
#                              Your own folders                                 #
#################################################################################

@register_dataset("imagefolder", splits=("train", "val", "test"))
def imagefolder(root: Path, split: str) -> ImageDataset:
    """Your own images: `<root>/train/<class>/*` and `<root>/test/<class>/*` (root is this folder)."""
    return _folder_dataset("imagefolder", split, root / split, root / "train", root)


imagefolder.has_split = lambda root, split: (Path(root) / split).is_dir()
