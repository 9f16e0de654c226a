"""Classifier training with synthetic data: backbones, strategies, augmentations, metrics, predict.

`mvc.classifier.predict` is the module (its `predict` function: `from mvc.classifier.predict import predict`).
Attributes are imported lazily so that importing the package (as `mvc` does, for the choices its strategies,
augmentations, optimizers and probes publish) does not pull in timm, torchvision or matplotlib.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "STRATEGIES": "strategies", "list_strategies": "strategies", "build_strategy": "strategies",
    "build_model": "models", "apply_cifar_stem": "models",
    "compute_metrics": "metrics", "AUGMENTATIONS": "augment", "OPTIMIZERS": "engine", "PROBES": "probe",
    "train_one_epoch": "engine", "evaluate": "engine", "prepare_data": "data",
    "run_classifier": "train", "run_all": "train",
    "load_classifier": "predict", "predict_images": "predict", "list_images": "predict",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"mvc.classifier.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'mvc.classifier' has no attribute {name!r}")
