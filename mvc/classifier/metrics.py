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
