"""Classifier preprocessing (read from the model) and the classic augmentations, registered by name.

Images go through two stages: a deterministic `pre` step (resize / centre-crop to the model's input
size, to a uint8 tensor (3, S, S)), cached in memory for small sets, and a random `post` step (the
augmentation, then float + normalisation with the model's mean/std). Real and synthetic images share both.
"""

from __future__ import annotations

from typing import Callable

import torch

from mvc.registry import Registry

AUGMENTATIONS: Registry[Callable[..., list]] = Registry("augmentation")
AUTOAUGMENT_POLICIES = ("cifar10", "imagenet", "svhn")


@AUGMENTATIONS.register("none")
def _none(size: int, policy: str) -> list:
    return []


@AUGMENTATIONS.register("standard")
def _standard(size: int, policy: str) -> list:
    from torchvision.transforms import v2

    return [v2.RandomCrop(size, padding=max(1, size // 8)), v2.RandomHorizontalFlip()]


@AUGMENTATIONS.register("autoaugment")
def _autoaugment(size: int, policy: str) -> list:
    from torchvision.transforms import v2

    return [v2.AutoAugment(v2.AutoAugmentPolicy(policy))]


@AUGMENTATIONS.register("randaugment")
def _randaugment(size: int, policy: str) -> list:
    from torchvision.transforms import v2

    return [v2.RandAugment()]


@AUGMENTATIONS.register("trivialaugment")
def _trivialaugment(size: int, policy: str) -> list:
    from torchvision.transforms import v2

    return [v2.TrivialAugmentWide()]


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
    """Random augmentation (`AUGMENTATIONS`) on the uint8 tensor, then float in [0, 1] and normalisation."""
    from torchvision.transforms import v2

    steps = AUGMENTATIONS.get(augment)(meta.input_size, policy)
    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(meta.mean, meta.std)])
