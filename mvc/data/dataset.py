"""`ImageDataset` (one class for every dataset and subset view), the factory, low-data subsets."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mvc.core import seeds
from mvc.core.registry import Registry, publish_choices
from mvc.core.seeds import resolve_seed
from mvc.core.utils import MVCError
from mvc.core.utils import fingerprint as _hash

log = logging.getLogger(__name__)

DATASETS: Registry[Callable[..., "ImageDataset"]] = Registry("dataset")
EVAL_SPLITS = ("test", "val")  # what data.test_split may name
publish_choices("dataset", DATASETS)  # filled by mvc.data.sources
publish_choices("eval split", EVAL_SPLITS)


def list_datasets() -> list[str]:
    """Names of the registered datasets (cheap: nothing is read from disk)."""
    return DATASETS.names()


#################################################################################
#                          Image sources (storage)                              #
#################################################################################

class ArraySource:
    """Images held in memory as uint8 arrays: (N, H, W) grayscale or (N, H, W, 3) RGB."""

    def __init__(self, images: np.ndarray):
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"expected uint8 (N,H,W[,3]) images, got {images.dtype} {images.shape}")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def load(self, j: int):
        """The j-th image as an RGB PIL image."""
        from PIL import Image

        arr = self.images[j]  # (H, W) or (H, W, 3)
        im = Image.fromarray(arr, "L" if arr.ndim == 2 else "RGB")
        return im.convert("RGB") if im.mode != "RGB" else im


class FileSource:
    """Images read from files on access (decoded and converted to RGB by `load_rgb`)."""

    def __init__(self, paths: Sequence[str | Path]):
        self.paths = [str(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, j: int):
        """The j-th file as an RGB PIL image (MVCError naming the file if it cannot be decoded)."""
        from mvc.data.images import load_rgb

        return load_rgb(self.paths[j])


#################################################################################
#                               ImageDataset                                    #
#################################################################################

class ImageDataset:
    """A labelled image dataset or a view of one: `ds[i] -> (PIL RGB image, int label)`.

    `index` maps the view's positions to the source's images, so `subset()` copies no pixels.
    """

    def __init__(self, name: str, split: str, classes: list[str], targets: Sequence[int] | np.ndarray,
                 ids: Sequence[str], source: ArraySource | FileSource, index: np.ndarray | None = None):
        self.name = name
        self.split = split
        self.classes = list(classes)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.ids = list(ids)
        self.source = source
        self.index = np.arange(len(source), dtype=np.int64) if index is None else np.asarray(index, dtype=np.int64)
        if not (len(self.targets) == len(self.ids) == len(self.index)):
            raise ValueError("targets, ids and index must have the same length")
        if len(self.targets) and (self.targets.min() < 0 or self.targets.max() >= len(self.classes)):
            raise ValueError("targets out of range of classes")
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.load_image(i), int(self.targets[i])

    def __repr__(self) -> str:
        return f"ImageDataset({self.name!r}, split={self.split!r}, n={len(self)}, classes={len(self.classes)})"

    def load_image(self, i: int):
        """The i-th image of this view as an RGB PIL image."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        return self.source.load(int(self.index[i]))

    def fingerprint(self) -> str:
        """A short hash of name, split, ids and targets (identifies this exact set of images)."""
        if self._fingerprint is None:
            self._fingerprint = _hash(self.name, self.split, self.ids, self.targets)
        return self._fingerprint

    def subset(self, indices: Sequence[int] | np.ndarray) -> "ImageDataset":
        """A view of the images at `indices` (positions in this view); same classes, ids kept."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"subset indices out of range for {len(self)} images")
        return ImageDataset(self.name, self.split, self.classes, self.targets[idx],
                            [self.ids[j] for j in idx], self.source, self.index[idx])

    def class_counts(self) -> np.ndarray:
        """Images per class, (num_classes,) int64."""
        return np.bincount(self.targets, minlength=len(self.classes))


#################################################################################
#                                 Factory                                       #
#################################################################################

def build_dataset(name: str, root: str | Path, split: str = "train", **kw: Any) -> ImageDataset:
    """Build dataset `name` from `root` (its data root; for `imagefolder` the folder itself)."""
    builder = DATASETS.get(name)
    splits = getattr(builder, "splits", ("train", "test"))
    if split not in splits:
        raise MVCError(f"dataset {name!r} has no split {split!r}; choose one of {', '.join(splits)}")
    params = inspect.signature(builder).parameters
    unknown = [k for k in kw if k not in params]
    if unknown:
        raise MVCError(f"dataset {name!r} does not take option(s) {', '.join(unknown)}")
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():  # else a dataset with a fallback location would quietly use that
        raise MVCError(f"data.root {str(root)!r} is a file, not a folder")
    ds = builder(root, split, **kw)
    if len(ds) == 0:
        raise MVCError(f"dataset {name!r} split {split!r} under {root} has no usable images")
    return ds


def register_dataset(name: str, splits: tuple[str, ...] = ("train", "test")):
    """Decorator: register a builder `(root, split, **options) -> ImageDataset` with its splits."""
    def deco(fn):
        fn.splits = splits
        return DATASETS.register(name)(fn)
    return deco


#################################################################################
#                              Low-data subsets                                 #
#################################################################################

def draw_per_class(targets: np.ndarray, num_classes: int, take: Callable[[int], int],
                     seed: int, role: str = "subset") -> tuple[np.ndarray, np.ndarray]:
    """Per class, draw `take(n_class)` positions at random: (taken, rest), each sorted.

    Each class has its own generator (seed, role, class), so one class's draw never shifts another's.
    """
    taken, rest = [], []
    for c in range(num_classes):
        idx = np.flatnonzero(targets == c)
        perm = seeds.numpy_rng(seed, role, c).permutation(idx)
        k = min(take(len(idx)), len(idx))
        taken.append(perm[:k])
        rest.append(perm[k:])
    cat = lambda xs: np.sort(np.concatenate(xs)) if xs else np.zeros(0, np.int64)  # noqa: E731
    return cat(taken).astype(np.int64), cat(rest).astype(np.int64)


def low_data_subset(ds: ImageDataset, k_per_class: int | None,
                    seed: int | None = 0) -> tuple[ImageDataset, ImageDataset]:
    """(labelled, pool): `k_per_class` random images of each class, and the disjoint remainder.

    `k_per_class=None` labels everything (empty pool). A class with fewer than k images gives all it
    has, with one warning naming such classes.
    """
    if k_per_class is None:
        return ds.subset(np.arange(len(ds))), ds.subset(np.zeros(0, np.int64))
    if int(k_per_class) < 1:
        raise MVCError(f"k_per_class must be >= 1 or null (all images), got {k_per_class}")
    k = int(k_per_class)
    seed = resolve_seed(seed)
    counts = ds.class_counts()
    short = [f"{ds.classes[c]!r} ({counts[c]})" for c in range(len(ds.classes)) if counts[c] < k]
    if short:
        log.warning(f"{ds.name}: {len(short)} class(es) have fewer than k_per_class={k} images; "
                    f"using all they have: {', '.join(short[:5])}{' ...' if len(short) > 5 else ''}")
    labelled, pool = draw_per_class(ds.targets, len(ds.classes), lambda n: k, seed)
    return ds.subset(labelled), ds.subset(pool)


def load_splits(data_cfg: Any) -> tuple[ImageDataset, ImageDataset, ImageDataset]:
    """(labelled, pool, test) for a `DataConfig`: the low-data subset, its remainder, the eval split.

    `test_split="val"` uses the dataset's own val split when it has one (an imagefolder with a
    `val/` folder); otherwise `val_fraction` of each class of the pool is held out (seeded by
    `subset_seed`) and removed from the pool, so labelled, pool and val stay disjoint.
    """
    name, root = data_cfg.name, Path(data_cfg.root)
    builder = DATASETS.get(name)
    kw = {}
    if "test_fraction" in inspect.signature(builder).parameters:
        kw["test_fraction"] = getattr(data_cfg, "test_fraction", 0.2)
    train = build_dataset(name, root, "train", **kw)
    labelled, pool = low_data_subset(train, data_cfg.k_per_class, data_cfg.subset_seed)
    if data_cfg.test_split == "val" and not _has_native_split(builder, root, "val"):
        frac = float(getattr(data_cfg, "val_fraction", 0.1))
        # take at least one val image from every class that has any pool images left
        val_pos, pool_pos = draw_per_class(pool.targets, len(pool.classes),
                                           lambda n: max(1, int(round(frac * n))) if n else 0,
                                           data_cfg.subset_seed, role="val_split")
        if len(val_pos) == 0:
            raise MVCError(f"no images left for a 'val' split after taking k_per_class={data_cfg.k_per_class}; "
                           f"lower data.k_per_class or use data.test_split=test")
        val = pool.subset(val_pos)
        val.split = "val"  # a held-out view of train, marked so its fingerprint differs from the pool's
        return labelled, pool.subset(pool_pos), val
    test = build_dataset(name, root, data_cfg.test_split, **kw)
    return labelled, pool, test


def describe_eval_split(data_cfg: Any) -> str:
    """What `load_splits` evaluates on, in words for a report (Caltech101 has no official split: it is drawn)."""
    builder = DATASETS.get(data_cfg.name)
    if data_cfg.test_split == "val":
        if _has_native_split(builder, Path(data_cfg.root), "val"):
            return "the val split"
        return f"a seeded {round(100 * data_cfg.val_fraction)}% per-class val split of the unlabelled remainder"
    if "test_fraction" in inspect.signature(builder).parameters:
        return (f"a seeded, class-stratified {round(100 * data_cfg.test_fraction)}% test split "
                "(the dataset has no official one)")
    if data_cfg.name == "imagefolder":
        return "the folder's test split"
    return getattr(builder, "test_description", "the official test split")


def _has_native_split(builder: Callable, root: Path, split: str) -> bool:
    """True when the dataset itself provides `split` (and, for folders, it exists on disk)."""
    has = getattr(builder, "has_split", None)
    if has is not None:
        return bool(has(root, split))
    return split in getattr(builder, "splits", ())
