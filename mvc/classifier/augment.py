"""Classifier preprocessing (read from the model) and the classic augmentations, applied to whole batches.

Images go through two stages:
- `pre` (deterministic, per image): resize / centre-crop to the model's input size, to a uint8 tensor
  (3, S, S); its results are cached in memory for small sets (`mvc.classifier.data.Prepared`);
- `Augment` (random, per batch, in the loader's collate): the augmentation, then float + the model's
  mean/std normalisation. Random crop (zero padding S/8) and horizontal flip run on the whole uint8
  batch at once; a policy (AutoAugment, Fast AutoAugment, RandAugment, TrivialAugment) then runs per
  image, *after* crop and flip, as torchvision's and timm's recipes apply it. Real and synthetic share both.

`AUGMENTATIONS` maps a name to its policy (None: crop and flip alone, 'standard'; 'none': evaluation).
AutoAugment and Fast AutoAugment take the policy of `classifier.autoaugment_policy` (cifar10, imagenet, svhn).
"""

from __future__ import annotations

from typing import Callable

import torch

from mvc.core.registry import Registry, publish_choices

AUGMENTATIONS: Registry[Callable[..., list] | None] = Registry("augmentation")
AUTOAUGMENT_POLICIES = ("cifar10", "imagenet", "svhn")
publish_choices("augmentation", AUGMENTATIONS)
publish_choices("autoaugment policy", AUTOAUGMENT_POLICIES)


def _policy(name: str) -> Callable[[str], list]:
    def build(policy: str) -> list:
        from torchvision.transforms import v2

        if name == "autoaugment":
            return [v2.AutoAugment(v2.AutoAugmentPolicy(policy))]
        if name == "fastautoaugment":
            from mvc.classifier.fast_autoaugment import FastAutoAugment
            return [FastAutoAugment(policy)]
        return [{"randaugment": v2.RandAugment, "trivialaugment": v2.TrivialAugmentWide}[name]()]
    return build


AUGMENTATIONS.register("none")(None)
AUGMENTATIONS.register("standard")(None)
for _name in ("autoaugment", "fastautoaugment", "randaugment", "trivialaugment"):
    AUGMENTATIONS.register(_name)(_policy(_name))


def build_pre(meta) -> Callable:
    """Deterministic PIL -> uint8 tensor (3, S, S): resize (then centre-crop when crop_pct < 1)."""
    from torchvision.transforms import v2

    s = meta.input_size
    if meta.crop_pct < 1.0:
        steps = [v2.Resize(int(round(s / meta.crop_pct)), antialias=True), v2.CenterCrop(s)]
    else:
        steps = [v2.Resize((s, s), antialias=True)]
    return v2.Compose([v2.PILToTensor(), *steps])


def random_crop_flip(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Per image of a uint8 batch (B, C, S, S): a random S x S crop of the zero-padded image, then a
    horizontal flip with probability 1/2 (torch's global RNG, seeded per epoch by the caller)."""
    B, _, H, W = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))  # (B, C, H + 2p, W + 2p), zeros
    off = torch.randint(0, 2 * pad + 1, (B, 2))
    flip = torch.rand(B) < 0.5
    out = torch.empty_like(x)
    for b in range(B):  # B slices: cheap next to per-image transform objects
        crop = padded[b, :, off[b, 0]:off[b, 0] + H, off[b, 1]:off[b, 1] + W]
        out[b] = crop.flip(-1) if flip[b] else crop
    return out


class Augment:
    """uint8 batch (B, 3, S, S) -> augmented, normalised float batch, for one augmentation name."""

    def __init__(self, meta, augment: str = "none", policy: str = "cifar10"):
        build = AUGMENTATIONS.get(augment)
        self.crop_flip = augment != "none"
        self.pad = max(1, meta.input_size // 8)
        if build is not None:
            from torchvision.transforms import v2

            self.policy = v2.Compose(build(policy))
        else:
            self.policy = None
        self.mean = torch.tensor(meta.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(meta.std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.crop_flip:
            x = random_crop_flip(x, self.pad)
        if self.policy is not None:
            x = torch.stack([self.policy(im) for im in x])  # per image, after crop and flip
        return (x.float() / 255.0 - self.mean) / self.std
