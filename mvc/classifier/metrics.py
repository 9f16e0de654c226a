"""Classification metrics (scikit-learn), the confusion-matrix figure, and mean ± std over seeds."""

from __future__ import annotations

import numpy as np

SCALARS = ["accuracy", "precision_macro", "recall_macro", "f1_macro"]


def compute_metrics(y_true, y_pred, num_classes: int) -> dict:
    """Accuracy, macro precision/recall/F1, per-class accuracy (= recall) and the confusion matrix (scikit-learn).

    Macro averages run over all `num_classes` classes; a class never predicted has precision 0 and a
    class absent from `y_true` has recall 0 (zero_division=0), so a missing class lowers the average
    instead of vanishing from it.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    labels = list(range(num_classes))
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    cm = confusion_matrix(y_true, y_pred, labels=labels)  # rows true, columns predicted
    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        "precision_macro": float(np.mean(precision)),
        "recall_macro": float(np.mean(recall)),
        "f1_macro": float(np.mean(f1)),
        "per_class_accuracy": [float(v) for v in recall],
        "confusion_matrix": cm.tolist(),
        "num_samples": int(len(y_true)),
    }


ANNOTATE_MAX = 25   # classes up to which every cell shows its count
LABEL_MAX = 40      # classes up to which every class name is a tick label (beyond: every k-th)
MAX_INCHES = 11.0   # the figure's side (at 120 dpi: at most about 1,300 px, whatever the class count)


def confusion_figure(cm, classes: list[str], title: str = ""):
    """A matplotlib figure of the confusion matrix (rows true, columns predicted), readable at any class count.

    Up to ANNOTATE_MAX classes every cell carries its count; beyond, the colour (with a colour bar) does,
    and rows are normalised by the class's test count so that classes of different sizes compare.
    The side grows with the class count up to MAX_INCHES; beyond LABEL_MAX classes every k-th class is labelled.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    n = len(classes)
    annotate = n <= ANNOTATE_MAX
    side = min(1.5 + 0.45 * n, MAX_INCHES)
    fig, ax = plt.subplots(figsize=(side + (0 if annotate else 1.2), side))
    shown = cm if annotate else cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(shown, cmap="Blues", interpolation="nearest")
    step = 1 if n <= LABEL_MAX else int(np.ceil(n / LABEL_MAX))
    ticks = list(range(0, n, step))
    size = 7 if n <= LABEL_MAX // 2 else 5
    ax.set_xticks(ticks, [classes[i][:12] for i in ticks], rotation=90, fontsize=size)
    ax.set_yticks(ticks, [classes[i][:12] for i in ticks], fontsize=size)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    if annotate:
        hi = cm.max() if cm.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if cm[i, j] > hi / 2 else "black")
    else:
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    return fig


def mean_std(runs: list[dict], keys: list[str] = SCALARS) -> dict:
    """{key: {"mean", "std", "values"}} over runs; std is the sample std (ddof=1), 0 for a single run."""
    out = {}
    for k in keys:
        vals = [float(r[k]) for r in runs if r.get(k) is not None]
        if vals:
            out[k] = {"mean": float(np.mean(vals)), "std": sample_std(vals), "values": vals}
    return out


def sample_std(values) -> float:
    """Sample standard deviation (ddof=1) of a list of numbers; 0 for fewer than two."""
    v = np.asarray(values, dtype=np.float64)
    return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
