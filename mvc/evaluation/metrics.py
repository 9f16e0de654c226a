"""Synthetic-set metrics, pure functions of features, predictions and labels (numpy / scipy).

Features are a reference classifier's pooled features (N, D); distances between images are cosine
distances (1 - cos), so a blurrier, lower-contrast image is not "more similar" only because its
features are smaller. The Fréchet distance uses the raw features, as FID does with Inception's.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float64)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


def cosine_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) matrix of 1 - cos(a_i, b_j), in [0, 2]."""
    return np.clip(1.0 - _unit(a) @ _unit(b).T, 0.0, 2.0)


#################################################################################
#                                   Fidelity                                    #
#################################################################################

def label_fidelity(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """The share of images the reference assigns to their intended class: overall and per class
    (None for a class without images)."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    hit = pred == labels
    per = [float(hit[labels == c].mean()) if (labels == c).any() else None for c in range(num_classes)]
    return {"overall": float(hit.mean()) if len(hit) else float("nan"), "per_class": per,
            "count": [int((labels == c).sum()) for c in range(num_classes)]}


#################################################################################
#                                   Diversity                                   #
#################################################################################

def within_class_diversity(features: np.ndarray, labels: np.ndarray, num_classes: int,
                           max_per_class: int | None = None, rng: np.random.Generator | None = None) -> list:
    """Mean pairwise cosine distance between images of each class (None for a class with < 2 images).

    With `max_per_class`, a class with more images uses a random subset of that size.
    """
    out = []
    for c in range(num_classes):
        f = np.asarray(features)[np.asarray(labels) == c]
        if max_per_class is not None and len(f) > max_per_class:
            f = f[(rng or np.random.default_rng(0)).choice(len(f), max_per_class, replace=False)]
        if len(f) < 2:
            out.append(None)
            continue
        d = cosine_distances(f, f)
        out.append(float(d[np.triu_indices(len(f), 1)].mean()))
    return out


def diversity_ratio(syn: Sequence, real: Sequence) -> dict:
    """Per-class and mean ratio of synthetic to real within-class diversity (classes where both exist)."""
    per = [s / r if (s is not None and r not in (None, 0)) else None for s, r in zip(syn, real)]
    vals = [v for v in per if v is not None]
    return {"ratio": float(np.mean(vals)) if vals else float("nan"), "per_class": per,
            "synthetic": _mean(syn), "real": _mean(real)}


def _mean(values: Sequence) -> float:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else float("nan")


#################################################################################
#                              Distribution distance                            #
#################################################################################

def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D) and (M, D) (FID's formula).

    tr(sqrt(S1 S2)) is computed as the sum of square roots of the eigenvalues of the symmetric
    sqrt(S1) S2 sqrt(S1), which stays real and stable for the rank-deficient covariances of small sets.
    With fewer images than feature dimensions (min(N, M) < D, e.g. a few-shot set and 2048-d ResNet-50
    features) the same trace comes from the centred (N, D) and (M, D) factors X, Y of S1 = X^T X and
    S2 = Y^T Y: the eigenvalues of S1 S2 are the squared singular values of the (N, M) matrix X Y^T, so the
    trace is its nuclear norm -- exact, without the two D x D eigendecompositions (seconds at D = 2048).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    mu1, mu2 = a.mean(0), b.mean(0)
    if min(len(a), len(b)) < a.shape[1]:
        x, y = (a - mu1) / np.sqrt(len(a) - 1), (b - mu2) / np.sqrt(len(b) - 1)  # S1 = x^T x, S2 = y^T y (np.cov)
        cross = np.linalg.svd(x @ y.T, compute_uv=False).sum()
        d = float(((mu1 - mu2) ** 2).sum() + (x * x).sum() + (y * y).sum() - 2 * cross)
        return max(d, 0.0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # sqrt(S1), symmetric
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()
    d = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)
    return max(d, 0.0)


#################################################################################
#                                    Novelty                                    #
#################################################################################

def novelty(syn: np.ndarray, source: np.ndarray, labelled: np.ndarray) -> dict:
    """How far each synthetic image is from its own source and from the nearest *other* labelled image.

    `source[i]` is the row of image i's source in `labelled` (-1: none). Also returns the same
    nearest-other distance among the labelled images themselves (the scale of "a different image"),
    and the share of synthetic images whose nearest labelled image is their own source.
    """
    syn, labelled, source = np.asarray(syn), np.asarray(labelled), np.asarray(source)
    d = cosine_distances(syn, labelled)  # (S, L)
    has = source >= 0
    rows = np.arange(len(syn))
    to_source = d[rows[has], source[has]]
    masked = d.copy()
    masked[rows[has], source[has]] = np.inf  # "other": never the source itself
    nearest_other = masked.min(1)
    dl = cosine_distances(labelled, labelled)
    np.fill_diagonal(dl, np.inf)
    real_nn = dl.min(1)
    return {"to_source": float(to_source.mean()) if len(to_source) else float("nan"),
            "to_nearest_other": float(nearest_other.mean()) if len(syn) else float("nan"),
            "real_nearest_other": float(real_nn[np.isfinite(real_nn)].mean()) if len(labelled) > 1 else float("nan"),
            "nearest_is_source": float((d[rows[has]].argmin(1) == source[has]).mean()) if has.any() else float("nan"),
            "per_image_to_source": [float(v) for v in to_source]}


#################################################################################
#                          Equivalent real images                               #
#################################################################################

def equivalent_real(sizes: Sequence[float], accuracies: Sequence[float], accuracy: float) -> dict:
    """Real images per class that `accuracy` is worth on a real-only accuracy-vs-size curve.

    The curve is interpolated linearly in log(size) between measured points (made monotone by a
    running maximum); outside the measured range the answer is a bound ("<" the smallest or ">" the
    largest size), never an extrapolation.
    """
    s = np.asarray(sizes, np.float64)
    a = np.maximum.accumulate(np.asarray(accuracies, np.float64)[np.argsort(s)])
    s = np.sort(s)
    if accuracy <= a[0]:
        return {"images_per_class": float(s[0]), "bound": "<=" if accuracy < a[0] else "="}
    if accuracy >= a[-1]:
        return {"images_per_class": float(s[-1]), "bound": ">=" if accuracy > a[-1] else "="}
    hi = int(np.searchsorted(a, accuracy, side="right"))  # a[hi - 1] <= accuracy < a[hi]
    lo = hi - 1
    t = (accuracy - a[lo]) / (a[hi] - a[lo])
    return {"images_per_class": float(math.exp(math.log(s[lo]) + t * (math.log(s[hi]) - math.log(s[lo])))),
            "bound": "="}
