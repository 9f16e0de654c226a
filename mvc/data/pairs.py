"""Index pairs (condition, target) drawn within each class; only int32 indices are stored.

Per class and round, two random permutations `p`, `q` of the class's images are paired one to one (`p[i]` is
the condition of target `q[i]`); positions where an image is paired with itself are repaired without breaking
either permutation (rotated among themselves, or one swapped with a random other position), so every image is
a condition exactly `rounds` times and a target exactly `rounds` times.
With a grouping (clustering-based sampling, `mvc.diffusion.clustering`), the same draw runs within each group of
a class: an image is paired only within its own concept, images outside every group are never paired, and a
group of one image gives no pair. The pairs file records the grouping's fingerprint, so pairs drawn with
another grouping (or none) are never reused.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mvc.core import seeds
from mvc.core.registry import publish_choices
from mvc.core.seeds import resolve_seed
from mvc.core.utils import MVCError, atomic_path
from mvc.core.utils import fingerprint as _hash

log = logging.getLogger(__name__)

PAIRS_FORMAT = 1
SMALL_CLASS_POLICIES = ("error", "skip")  # a class with fewer than 2 images: refuse it, or leave it out
publish_choices("small-class policy", SMALL_CLASS_POLICIES)


@dataclass
class Pairs:
    """`cond[i]` and `target[i]` are positions (int32) in the dataset/subset with `fingerprint`."""
    cond: np.ndarray
    target: np.ndarray
    fingerprint: str
    rounds: int
    seed: int
    skipped_classes: list[int] = field(default_factory=list)
    grouping: str = ""  # fingerprint of the groups pairs were drawn within ("" : whole classes)

    def __len__(self) -> int:
        return len(self.cond)


#################################################################################
#                                  Drawing                                      #
#################################################################################

def _derange_rows(p: np.ndarray, q: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Repair `q` (R, n) so that q != p everywhere, each row staying a permutation; needs n >= 2."""
    R, n = q.shape
    q = q.copy()
    rows, cols = np.nonzero(p == q)  # row-major, so each row's fixed positions are contiguous
    if len(rows) == 0:
        return q
    counts = np.bincount(rows, minlength=R)  # fixed positions per row
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])  # first fixed entry of each row
    per_entry = counts[rows]
    multi = per_entry >= 2
    # rows with >= 2 fixed positions: entry j takes the value of the next fixed entry of its row
    # (the last one wraps to the first); values at fixed positions are distinct, so none stays fixed
    pos = np.arange(len(rows))
    nxt = pos + 1
    last = nxt == starts[rows] + per_entry
    nxt[last] = starts[rows[last]]
    m = np.flatnonzero(multi)
    q[rows[m], cols[m]] = q[rows[nxt[m]], cols[nxt[m]]].copy()
    # rows with exactly one fixed position f: swap q[f] with q[j] for a random j != f
    s = np.flatnonzero(~multi)
    if len(s):
        r, f = rows[s], cols[s]
        j = (f + rng.integers(1, n, size=len(s))) % n
        qf, qj = q[r, f].copy(), q[r, j].copy()
        q[r, f], q[r, j] = qj, qf
    return q


def _as_targets(data: Any) -> tuple[np.ndarray, list[str] | None, str]:
    """(targets, class names or None, fingerprint) from an ImageDataset or an array of labels."""
    if hasattr(data, "targets") and hasattr(data, "fingerprint"):
        return np.asarray(data.targets, dtype=np.int64), list(data.classes), data.fingerprint()
    t = np.asarray(data, dtype=np.int64).reshape(-1)
    return t, None, _hash("targets", t)


def grouping_fingerprint(groups: np.ndarray | None) -> str:
    """What a pairs file records of the grouping it was drawn with ("" without one)."""
    return "" if groups is None else _hash("groups", np.asarray(groups, dtype=np.int64))


def _pair_rows(idx: np.ndarray, rounds: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`rounds` derangement rows over the positions `idx` (n >= 2): (cond, target), each (rounds * n,)."""
    n = len(idx)
    base = np.broadcast_to(np.arange(n), (rounds, n))
    p = rng.permuted(base, axis=1)  # (rounds, n): each row a permutation of the group's positions
    q = _derange_rows(p, rng.permuted(base, axis=1), rng)
    return idx[p].reshape(-1), idx[q].reshape(-1)


def build_pairs(data: Any, rounds: int, seed: int | None = 0, on_small_class: str = "error",
                fingerprint: str | None = None, groups: np.ndarray | None = None) -> Pairs:
    """Draw `rounds` x (class size) (condition, target) pairs per class of `data`.

    `data` is an ImageDataset (its fingerprint is recorded) or an array of labels (then pass
    `fingerprint`, else the labels' hash is used). A class with fewer than 2 images is an MVCError
    naming it, or with `on_small_class="skip"` a warning and no pairs for it. Pairs are ordered by
    class, then round; each class uses its own generator seeded from (seed, class).

    `groups` (N,) int, optional: a group id per image (-1: left out), e.g. the kept clusters of
    `mvc.diffusion.clustering.ConceptGroups.group_ids()`. Pairs are then drawn within each group of each class:
    `rounds` x (group size) per group, ordered by class, group, round; each group uses its own
    generator seeded from (seed, class, group). A group of one image gives none (a warning).
    """
    if on_small_class not in SMALL_CLASS_POLICIES:
        raise MVCError(f"on_small_class must be one of {', '.join(SMALL_CLASS_POLICIES)}, got {on_small_class!r}")
    if int(rounds) < 1:
        raise MVCError(f"pairs rounds must be >= 1, got {rounds}")
    rounds, seed = int(rounds), resolve_seed(seed)
    targets, names, fp = _as_targets(data)
    fp = fingerprint or fp
    if len(targets) >= 2**31:
        raise MVCError("too many images for int32 pair indices")
    num_classes = len(names) if names is not None else (int(targets.max()) + 1 if len(targets) else 0)
    label = (lambda c: f"{names[c]!r} (class {c})") if names is not None else (lambda c: f"class {c}")
    present = np.unique(targets) if names is None else np.arange(num_classes)
    by_class = [np.flatnonzero(targets == c) for c in range(num_classes)]
    small = [int(c) for c in present if len(by_class[c]) < 2]
    if small and on_small_class == "error":
        desc = ", ".join(f"{label(c)}: {len(by_class[c])} image(s)" for c in small[:5])
        raise MVCError(f"cannot pair classes with fewer than 2 images: {desc}; add images, "
                       f"raise data.k_per_class or set data.on_small_class=skip")
    if small:
        log.warning(f"no pairs for {len(small)} class(es) with fewer than 2 images: "
                    f"{', '.join(label(c) for c in small[:5])}{' ...' if len(small) > 5 else ''}")
    if groups is not None:
        groups = np.asarray(groups, dtype=np.int64).reshape(-1)
        if groups.shape != targets.shape:
            raise MVCError(f"pairs groups: {len(groups)} group ids for {len(targets)} images")
    conds, tgts, lonely, unpaired = [], [], [], []
    for c in present:
        idx = by_class[c]
        if len(idx) < 2:
            continue
        if groups is None:
            rows = [_pair_rows(idx, rounds, seeds.numpy_rng(seed, "pairs", int(c)))]
        else:
            rows = []
            for g in np.unique(groups[idx][groups[idx] >= 0]):
                members = idx[groups[idx] == g]
                if len(members) < 2:
                    lonely.append(f"{label(c)} group {int(g)}")
                    continue
                rows.append(_pair_rows(members, rounds, seeds.numpy_rng(seed, "pairs", int(c), int(g))))
            if not rows:
                unpaired.append(int(c))
        conds.extend(cond for cond, _ in rows)
        tgts.extend(target for _, target in rows)
    if lonely:
        log.warning(f"no pairs for {len(lonely)} group(s) with a single image: {', '.join(lonely[:5])}"
                    f"{' ...' if len(lonely) > 5 else ''}")
    if unpaired:
        log.warning(f"no pairs at all for {len(unpaired)} class(es) without a group of 2 or more images: "
                    f"{', '.join(label(c) for c in unpaired[:5])}{' ...' if len(unpaired) > 5 else ''}")
    if not conds:
        raise MVCError("no class has 2 or more images" + (" in one group" if groups is not None else "")
                       + ": there is nothing to pair")
    cond = np.concatenate(conds).astype(np.int32)
    target = np.concatenate(tgts).astype(np.int32)
    return Pairs(cond, target, fp, rounds, seed, sorted(small + unpaired), grouping_fingerprint(groups))


#################################################################################
#                                  Storage                                      #
#################################################################################

def save_pairs(path: str | os.PathLike, pairs: Pairs) -> None:
    """Write `pairs` atomically as an uncompressed .npz (int32 arrays + fingerprint, rounds, seed)."""
    extra = {"grouping": np.array(pairs.grouping)} if pairs.grouping else {}  # whole classes: the file as before
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:  # a file object, so numpy does not append its own ".npz"
            np.savez(f, cond=pairs.cond.astype(np.int32), target=pairs.target.astype(np.int32),
                     fingerprint=np.array(pairs.fingerprint), rounds=np.array(pairs.rounds, np.int64),
                     seed=np.array(pairs.seed, np.int64), skipped_classes=np.array(pairs.skipped_classes, np.int64),
                     format=np.array(PAIRS_FORMAT, np.int64), **extra)


def load_pairs(path: str | os.PathLike, expected_fingerprint: str | None = None,
               rounds: int | None = None, seed: int | None = None, grouping: str | None = None) -> Pairs:
    """Read pairs saved by `save_pairs`; MVCError if missing, corrupt, drawn for another dataset/subset,
    or (when `rounds`/`seed`/`grouping` are given) drawn with other settings."""
    path = Path(path)
    if not path.is_file():
        raise MVCError(f"pairs file not found: {path}; run the pairs step first")
    try:
        with np.load(path, allow_pickle=False) as z:
            cond, target = z["cond"], z["target"]
            fp, saved_rounds, saved_seed = str(z["fingerprint"]), int(z["rounds"]), int(z["seed"])
            skipped = [int(c) for c in z["skipped_classes"]] if "skipped_classes" in z else []
            saved_grouping = str(z["grouping"]) if "grouping" in z else ""
    except Exception as e:
        raise MVCError(f"{path} is not a readable pairs file ({type(e).__name__}: {e}); delete it and redraw") from None
    if cond.dtype != np.int32 or target.dtype != np.int32 or cond.shape != target.shape or cond.ndim != 1:
        raise MVCError(f"{path}: cond/target must be two int32 arrays of equal length; delete it and redraw")
    if expected_fingerprint is not None and fp != expected_fingerprint:
        raise MVCError(f"{path} was drawn for dataset/subset {fp}, not the current one ({expected_fingerprint}); "
                       f"delete it or rerun the pairs step")
    for key, want, got in (("rounds", rounds, saved_rounds), ("seed", seed, saved_seed)):
        if want is not None and int(want) != got:
            raise MVCError(f"{path} was drawn with pairs.{key}={got}, not {want}; delete it or rerun the pairs step")
    if grouping is not None and grouping != saved_grouping:
        drawn = f"within the groups {saved_grouping}" if saved_grouping else "within whole classes"
        raise MVCError(f"{path} was drawn {drawn}, not with the current sampling (groups "
                       f"{grouping or 'none'}); delete it or rerun the pairs step")
    return Pairs(cond, target, fp, saved_rounds, saved_seed, skipped, saved_grouping)
