"""Classifier data: the splits of one run, selections, the real+synthetic dataset, and loaders that
follow a strategy's plan.

Real images come from the dataset registry (`mvc.data`), synthetic ones from the synthetic-set format
(`mvc.data.synthetic`); both go through the model's preprocessing (`mvc.classifier.augment`).
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mvc.classifier.augment import Augment, build_pre
from mvc.core import seeds
from mvc.core.seeds import seed_worker
from mvc.core.utils import MVCError

log = logging.getLogger(__name__)

CACHE_LIMIT_BYTES = 1 << 30  # cache pre-processed uint8 images of a set when they fit in 1 GiB


#################################################################################
#                              Index selections                                 #
#################################################################################

def stratified_take(targets: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Up to `n` indices, class-balanced (round-robin over classes in a random order), sorted."""
    targets = np.asarray(targets)
    if n >= len(targets):
        return np.arange(len(targets))
    per = [rng.permutation(np.flatnonzero(targets == c)) for c in np.unique(targets)]
    depth = max(len(p) for p in per)
    # (depth, classes) grid read row by row: the first n cells are as balanced as possible
    grid = [p[d] for d in range(depth) for p in per if d < len(p)]
    return np.sort(np.asarray(grid[:n], dtype=np.int64))


def hold_out_per_class(targets: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train, held_out) indices: `fraction` of each class held out (at least 1, leaving at least 1)."""
    targets = np.asarray(targets)
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
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seeds.derive_seed(seed, "classifier.folds") % 2**32)
    return [(tr.astype(np.int64), te.astype(np.int64)) for tr, te in skf.split(np.zeros(len(targets)), targets)]


def prepare_data(run, splits=None) -> dict:
    """Real train / val / test sets and the synthetic set of one run (a `RunSpec`; all `ImageDataset`s)."""
    from mvc.data.synthetic import check_provenance, load_synthetic_set, set_fingerprint

    c, data_cfg, seed, fold = run.classifier, run.data, run.seed, run.fold
    if splits is None:
        from mvc.data import load_splits
        splits = load_splits(data_cfg)
    labelled, _pool, test = splits
    classes = list(labelled.classes)
    held_out: set[str] = set()
    train = labelled
    if fold is not None:
        tr, te = kfold_splits(labelled.targets, c.kfold, data_cfg.subset_seed)[fold]
        train, test = labelled.subset(tr), labelled.subset(te)
        held_out |= set(test.ids)
    elif c.test_limit is not None and len(test) > c.test_limit:
        # the same class-balanced test subset for every seed and strategy (drawn from the data subset seed)
        test = test.subset(stratified_take(test.targets, c.test_limit,
                                           seeds.numpy_rng(data_cfg.subset_seed, "classifier.test_subset")))
    val = None
    if c.val_fraction > 0:
        tr, va = hold_out_per_class(train.targets, c.val_fraction, seeds.numpy_rng(data_cfg.subset_seed, "classifier.val"))
        train, val = train.subset(tr), train.subset(va)
        held_out |= set(val.ids)
    syn, syn_fp = None, None
    if run.synthetic_dir is not None:
        syn_dir = run.synthetic_dir
        check_provenance(syn_dir, labelled, data_cfg.root)  # a set of another run, or real images, is refused
        syn = load_synthetic_set(syn_dir, classes, exclude_sources=held_out)
        if len(syn) == 0:
            raise MVCError(f"strategy {c.strategy!r} needs synthetic images but {syn_dir} has none; "
                           f"run generate_mvc.py first, set classifier.synthetic_dir, or use --strategy real")
        syn = syn.subset(select_synthetic(syn.targets, len(train), c.synthetic_ratio, seed))
        syn_fp = set_fingerprint(syn_dir)  # its settings and records: what a resume must find again
    return {"classes": classes, "train": train, "val": val, "test": test, "synthetic": syn,
            "synthetic_fingerprint": syn_fp}


def select_synthetic(targets: np.ndarray, n_real: int, ratio: float | None, seed: int) -> np.ndarray:
    """Indices of the synthetic images used: all, or a class-balanced `ratio * n_real` of them."""
    if ratio is None:
        return np.arange(len(targets))
    return stratified_take(targets, int(round(ratio * n_real)), seeds.numpy_rng(seed, "classifier.select"))


class Prepared(Dataset):
    """`source[i]` through `pre` (cached in memory when the whole set fits): items are
    (uint8 image (3, S, S), label, is_synthetic); the loader's `Augment` turns batches into model inputs."""

    def __init__(self, source, pre: Callable, synthetic: bool = False, cache: bool | None = None):
        self.source, self.pre, self.synthetic = source, pre, synthetic
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
        return self.raw(i), int(self.targets[i]), self.synthetic

    def warm(self, progress: bool = True) -> None:
        """Fill the cache in this process, so DataLoader workers (which get copies) start with it full."""
        if self._cache is None:
            return
        for i in tqdm(range(len(self)), desc="caching images", unit="img", disable=not progress, leave=False):
            self.raw(i)


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


def prepared(source, meta, synthetic: bool = False) -> Prepared:
    """A `Prepared` set with the model's preprocessing."""
    pre = build_pre(meta)
    pre.size_hint = meta.input_size  # for the cache-size estimate
    return Prepared(source, pre, synthetic=synthetic)


#################################################################################
#                                   Loaders                                     #
#################################################################################

class Collate:
    """Stack (uint8 x, y, is_syn) items and augment the batch: (B, 3, S, S) float, (B,) labels, (B,) bool."""

    def __init__(self, augment: Augment):
        self.augment = augment

    def __call__(self, items):
        xs, ys, ss = zip(*items)
        return (self.augment(torch.stack(xs)), torch.tensor(ys, dtype=torch.int64),
                torch.tensor(ss, dtype=torch.bool))


def plan_loader(dataset: Dataset, batches: list[np.ndarray], num_workers: int, generator: torch.Generator,
                augment: Augment) -> DataLoader:
    """A DataLoader that yields exactly `batches` (lists of dataset indices), augmented, workers seeded."""
    return DataLoader(dataset, batch_sampler=[b.tolist() for b in batches], num_workers=num_workers,
                      collate_fn=Collate(augment), worker_init_fn=seed_worker, generator=generator,
                      persistent_workers=False)


def shard_batches(batches: list[np.ndarray], rank: int, world: int) -> list[np.ndarray]:
    """This process's share of a global plan: every world-th batch, the tail trimmed so that every
    process runs the same number of steps (DDP all-reduces each step)."""
    n = (len(batches) // world) * world if world > 1 else len(batches)
    if n == 0:
        raise MVCError(f"an epoch has {len(batches)} batch(es), fewer than the {world} processes; "
                       f"lower classifier.batch_size")
    return batches[rank:n:world]


def eval_loader(dataset: Dataset, meta, batch_size: int, rank: int = 0, world: int = 1,
                num_workers: int = 0) -> DataLoader:
    """Sequential, unaugmented batches over this process's share (indices rank::world) of an evaluation set."""
    idx = np.arange(rank, len(dataset), world)
    batches = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    return DataLoader(dataset, batch_sampler=[b.tolist() for b in batches], num_workers=num_workers,
                      collate_fn=Collate(Augment(meta, "none")), worker_init_fn=seed_worker)
