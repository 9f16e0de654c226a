"""Classifier data: the synthetic-folder reader, index views, transforms, the real+synthetic dataset
and the per-epoch loader that follows a strategy's plan.

Images go through two stages: a deterministic `pre` step (resize / centre-crop to the model's input
size, to a uint8 tensor (3, S, S)) whose result is cached in memory for small sets, and a random
`post` step (classic augmentation, then float + normalise with the model's mean/std). Real and
synthetic images share both steps.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mvc.data.images import IMAGE_EXTENSIONS, load_rgb
from mvc.utils import MVCError, read_jsonl, safe_name, seed_worker

log = logging.getLogger(__name__)

CACHE_LIMIT_BYTES = 1 << 30  # cache pre-processed uint8 images of a set when they fit in 1 GiB


#################################################################################
#                          Views and the synthetic set                          #
#################################################################################

class IndexView:
    """A view of an ImageDataset-like object (`classes`, `targets`, `ids`, `ds[i] -> (PIL, int)`) on `indices`."""

    def __init__(self, base, indices: Sequence[int]):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.classes = list(base.classes)
        self.targets = np.asarray(base.targets, dtype=np.int64)[self.indices]
        self.ids = [base.ids[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[int(self.indices[i])]


class SyntheticImages:
    """The synthetic ImageFolder `<dir>/<safe class>/*.png`, labelled from `metadata.jsonl` (`label`),
    or, without metadata, by matching folder names to `safe_name(class)`."""

    def __init__(self, root: str | os.PathLike, classes: list[str]):
        self.root = Path(root)
        self.classes = list(classes)
        self.paths: list[Path] = []
        self.source_ids: list[str | None] = []
        targets: list[int] = []
        meta = self.root / "metadata.jsonl"
        if meta.is_file():
            for rec in read_jsonl(meta):
                if "file" not in rec or "label" not in rec:
                    raise MVCError(f"{meta}: every line needs 'file' and 'label'")
                label = int(rec["label"])
                if not 0 <= label < len(classes):
                    raise MVCError(f"{meta}: label {label} of {rec['file']} is outside 0..{len(classes) - 1}; "
                                   f"was it generated for another dataset?")
                name = rec.get("class_name")
                if name is not None and name != classes[label]:
                    raise MVCError(f"{meta}: {rec['file']} has label {label} = {classes[label]!r} but class_name {name!r}; "
                                   f"the synthetic set does not match this dataset")
                path = self.root / rec["file"]
                if not path.is_file():
                    raise MVCError(f"{meta} lists {rec['file']} but the file is missing; regenerate or fix the metadata")
                self.paths.append(path)
                targets.append(label)
                self.source_ids.append(rec.get("source_id"))
        elif self.root.is_dir():
            by_folder = {safe_name(c): i for i, c in enumerate(classes)}
            for sub in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
                if sub.name == "grids":
                    continue
                if sub.name not in by_folder:
                    raise MVCError(f"{sub}: folder does not match any class of the dataset (expected one of "
                                   f"{', '.join(list(by_folder)[:5])}...); add metadata.jsonl or rename it")
                for f in sorted(sub.iterdir()):
                    if f.suffix.lower() in IMAGE_EXTENSIONS:
                        self.paths.append(f)
                        targets.append(by_folder[sub.name])
                        self.source_ids.append(None)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.ids = [str(p.relative_to(self.root)) for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return load_rgb(self.paths[i]), int(self.targets[i])


def load_synthetic(root: str | os.PathLike, classes: list[str], exclude_sources: set[str] | None = None):
    """The synthetic set at `root` (empty when the folder does not exist), without images made from
    `exclude_sources` (real ids held out for validation / a k-fold test fold, to avoid leakage)."""
    syn = SyntheticImages(root, classes)
    if exclude_sources:
        keep = [i for i, s in enumerate(syn.source_ids) if s not in exclude_sources]
        if len(keep) < len(syn):
            log.info("dropping %d synthetic images made from held-out real images", len(syn) - len(keep))
            return IndexView(syn, keep)
    return syn


#################################################################################
#                              Index selections                                 #
#################################################################################

def stratified_take(targets: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Up to `n` indices, class-balanced (round-robin over classes in a seeded order), sorted."""
    targets = np.asarray(targets)
    if n >= len(targets):
        return np.arange(len(targets))
    rng = np.random.default_rng(seed)
    per = [rng.permutation(np.flatnonzero(targets == c)) for c in np.unique(targets)]
    depth = max(len(p) for p in per)
    # (depth, classes) grid read row by row: the first n cells are as balanced as possible
    grid = [p[d] for d in range(depth) for p in per if d < len(p)]
    return np.sort(np.asarray(grid[:n], dtype=np.int64))


def stratified_split(targets: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held_out) indices: `fraction` of each class held out (at least 1, leaving at least 1)."""
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in np.unique(targets):
        idx = rng.permutation(np.flatnonzero(targets == c))
        if len(idx) < 2:
            raise MVCError(f"class {c} has {len(idx)} labelled image(s); a validation split needs 2 per class")
        k = min(max(1, int(round(fraction * len(idx)))), len(idx) - 1)
        held.extend(idx[:k])
        train.extend(idx[k:])
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(held, dtype=np.int64))


def kfold_splits(targets: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold (train, test) index pairs over the labelled set."""
    from sklearn.model_selection import StratifiedKFold

    targets = np.asarray(targets)
    counts = np.bincount(targets)
    if k < 2:
        raise MVCError("classifier.kfold must be 0 (off) or >= 2")
    if counts[counts > 0].min() < k:
        raise MVCError(f"classifier.kfold={k} needs at least {k} labelled images per class "
                       f"(the smallest class has {counts[counts > 0].min()})")
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(tr.astype(np.int64), te.astype(np.int64)) for tr, te in skf.split(np.zeros(len(targets)), targets)]


def select_synthetic(targets: np.ndarray, n_real: int, ratio: float | None, seed: int) -> np.ndarray:
    """Indices of the synthetic images used: all, or a class-balanced `ratio * n_real` of them."""
    if ratio is None:
        return np.arange(len(targets))
    return stratified_take(targets, int(round(ratio * n_real)), seed)


#################################################################################
#                                  Transforms                                   #
#################################################################################

def build_pre(meta) -> Callable:
    """Deterministic PIL -> uint8 tensor (3, S, S): resize (then centre-crop when crop_pct < 1)."""
    from torchvision.transforms import v2

    s = meta.input_size
    if meta.crop_pct < 1.0:
        steps = [v2.Resize(int(round(s / meta.crop_pct)), antialias=True), v2.CenterCrop(s)]
    else:
        steps = [v2.Resize((s, s), antialias=True)]
    return v2.Compose([v2.PILToTensor(), *steps])


def build_post(meta, augment: str = "none", policy: str = "cifar10") -> Callable:
    """Random augmentation on the uint8 tensor, then float in [0, 1] and normalisation."""
    from torchvision.transforms import v2

    s = meta.input_size
    aug = {
        "none": [],
        "standard": [v2.RandomCrop(s, padding=max(1, s // 8)), v2.RandomHorizontalFlip()],
        "autoaugment": [v2.AutoAugment(v2.AutoAugmentPolicy(policy))],
        "randaugment": [v2.RandAugment()],
        "trivialaugment": [v2.TrivialAugmentWide()],
    }
    if augment not in aug:
        raise MVCError(f"unknown augmentation {augment!r}; choose one of {', '.join(aug)}")
    return v2.Compose([*aug[augment], v2.ToDtype(torch.float32, scale=True), v2.Normalize(meta.mean, meta.std)])


class Prepared(Dataset):
    """`source[i]` through `pre` (cached in memory when the whole set fits) and then `post`:
    items are (x (3, S, S) float, label, is_synthetic)."""

    def __init__(self, source, pre: Callable, post: Callable, synthetic: bool = False, cache: bool | None = None):
        self.source, self.pre, self.post, self.synthetic = source, pre, post, synthetic
        self.targets = np.asarray(source.targets, dtype=np.int64)
        self._cache: dict[int, torch.Tensor] | None = None
        if cache is None:
            s = getattr(pre, "size_hint", None) or 0
            cache = len(source) * 3 * max(s, 1) ** 2 <= CACHE_LIMIT_BYTES
        if cache:
            self._cache = {}

    def __len__(self) -> int:
        return len(self.source)

    def raw(self, i: int) -> torch.Tensor:
        """The pre-processed uint8 image i (3, S, S)."""
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        img, _ = self.source[i]
        x = self.pre(img)
        if self._cache is not None:
            self._cache[i] = x
        return x

    def __getitem__(self, i: int):
        return self.post(self.raw(i)), int(self.targets[i]), self.synthetic


class Combined(Dataset):
    """Real images at indices 0..R-1, synthetic at R..R+S-1 (the strategies' index space)."""

    def __init__(self, real: Prepared, synthetic: Prepared | None):
        self.real, self.synthetic = real, synthetic
        self.n_real = len(real)
        self.n_syn = len(synthetic) if synthetic is not None else 0

    def __len__(self) -> int:
        return self.n_real + self.n_syn

    def __getitem__(self, i: int):
        return self.real[i] if i < self.n_real else self.synthetic[i - self.n_real]


def prepared(source, meta, augment: str = "none", policy: str = "cifar10", synthetic: bool = False) -> Prepared:
    """A `Prepared` set with the model's preprocessing and the given augmentation."""
    pre = build_pre(meta)
    pre.size_hint = meta.input_size  # for the cache-size estimate
    return Prepared(source, pre, build_post(meta, augment, policy), synthetic=synthetic)


#################################################################################
#                                   Loaders                                     #
#################################################################################

def _collate(items):
    """Stack (x, y, is_syn) items into (B,3,S,S), (B,), (B,) bool."""
    xs, ys, ss = zip(*items)
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64), torch.tensor(ss, dtype=torch.bool)


def plan_loader(dataset: Dataset, batches: list[np.ndarray], num_workers: int, generator: torch.Generator) -> DataLoader:
    """A DataLoader that yields exactly `batches` (lists of dataset indices), workers seeded."""
    return DataLoader(dataset, batch_sampler=[b.tolist() for b in batches], num_workers=num_workers,
                      collate_fn=_collate, worker_init_fn=seed_worker, generator=generator,
                      persistent_workers=False)


def shard_batches(batches: list[np.ndarray], rank: int, world: int) -> list[np.ndarray]:
    """This process's share of a global plan: every world-th batch, the tail trimmed so that every
    process runs the same number of steps (DDP all-reduces each step)."""
    n = (len(batches) // world) * world if world > 1 else len(batches)
    if n == 0:
        raise MVCError(f"an epoch has {len(batches)} batch(es), fewer than the {world} processes; "
                       f"lower classifier.batch_size")
    return batches[rank:n:world]


def eval_loader(dataset: Dataset, batch_size: int, rank: int = 0, world: int = 1, num_workers: int = 0) -> DataLoader:
    """Sequential batches over this process's share (indices rank::world) of an evaluation set."""
    idx = np.arange(rank, len(dataset), world)
    batches = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    return DataLoader(dataset, batch_sampler=[b.tolist() for b in batches], num_workers=num_workers,
                      collate_fn=_collate, worker_init_fn=seed_worker)
