"""Classification metrics (pure numpy), the confusion-matrix figure, and mean ± std over seeds."""

from __future__ import annotations

import numpy as np

SCALARS = ["accuracy", "precision_macro", "recall_macro", "f1_macro"]


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts: rows are true classes, columns predicted classes."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def compute_metrics(y_true, y_pred, num_classes: int) -> dict:
    """Accuracy, macro precision/recall/F1, per-class accuracy (= recall) and the confusion matrix.

    Macro averages run over all `num_classes` classes; a class never predicted has precision 0 and a
    class absent from `y_true` has recall 0 (sklearn's zero_division=0), so a missing class lowers
    the average instead of vanishing from it.
    """
    cm = confusion_matrix(y_true, y_pred, num_classes)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)   # true counts per class
    predicted = cm.sum(axis=0).astype(np.float64)  # predicted counts per class
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    total = cm.sum()
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "f1_macro": float(f1.mean()),
        "per_class_accuracy": [float(v) for v in recall],
        "confusion_matrix": cm.tolist(),
        "num_samples": int(total),
    }


def confusion_figure(cm, classes: list[str], title: str = ""):
    """A matplotlib figure of the confusion matrix (rows true, columns predicted), counts annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * n, 0.8 + 0.5 * n))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), [c[:12] for c in classes], rotation=90, fontsize=7)
    ax.set_yticks(range(n), [c[:12] for c in classes], fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    hi = cm.max() if cm.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=6,
                    color="white" if cm[i, j] > hi / 2 else "black")
    fig.tight_layout()
    return fig


def mean_std(runs: list[dict], keys: list[str] = SCALARS) -> dict:
    """{key: {"mean", "std", "values"}} over runs (population std, 0 for a single run)."""
    out = {}
    for k in keys:
        vals = [float(r[k]) for r in runs if r.get(k) is not None]
        if vals:
            out[k] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "values": vals}
    return out
