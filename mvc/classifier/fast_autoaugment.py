"""Fast AutoAugment (Lim et al., "Fast AutoAugment", NeurIPS 2019) applied with torchvision's functional ops.

The policies are the authors' published searched ones (`mvc.classifier.fast_autoaugment_policies`, from
kakaobrain/fast-autoaugment `FastAutoAugment/archive.py`). As in the paper, each image gets ONE sub-policy
drawn uniformly at random, whose two operations are applied in order, each with its own probability; an
operation's level in [0, 1] is mapped linearly to its magnitude range below (the search space of the
paper, as the authors' `augmentations.py` states it), and the geometric operations take a random sign, as
AutoAugment's do. Magnitudes are fractions of the image where the paper's are (translate, cutout), so the
same policy serves 32-px and 224-px images. Works on a uint8 tensor (C, H, W) or a PIL image (same size
and mode back); draws come from `generator` (None: torch's global RNG, seeded per epoch by the loader).
"""

from __future__ import annotations

import math

import torch

from mvc.classifier.fast_autoaugment_policies import POLICIES, SubPolicy

# op -> (low, high) of its magnitude; None: the op has no magnitude
OP_RANGES: dict[str, tuple[float, float] | None] = {
    "ShearX": (-0.3, 0.3),        # shear factor
    "ShearY": (-0.3, 0.3),
    "TranslateX": (-0.45, 0.45),  # fraction of the width
    "TranslateY": (-0.45, 0.45),  # fraction of the height
    "Rotate": (-30.0, 30.0),      # degrees
    "AutoContrast": None,
    "Invert": None,
    "Equalize": None,
    "Solarize": (0.0, 256.0),     # threshold: pixels at or above it are inverted
    "Posterize": (4.0, 8.0),      # bits kept
    "Contrast": (0.1, 1.9),       # enhancement factor (1: unchanged)
    "Color": (0.1, 1.9),
    "Brightness": (0.1, 1.9),
    "Sharpness": (0.1, 1.9),
    "Cutout": (0.0, 0.2),         # side of the square, fraction of the width
}
SIGNED = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"})  # random sign, as AutoAugment
CUTOUT_FILL = (125, 123, 114)  # the grey the authors fill a cutout with (about the ImageNet mean)


def magnitude(op: str, level: float) -> float:
    """Level in [0, 1] -> the op's magnitude, linear over OP_RANGES[op] (0.0 for ops without one)."""
    rng = OP_RANGES[op]
    return 0.0 if rng is None else rng[0] + level * (rng[1] - rng[0])


def _rand(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def apply_op(img: torch.Tensor, op: str, level: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """One operation at `level` on a uint8 image (C, H, W); draws its sign / cutout position from `generator`."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    v = magnitude(op, level)
    if op in SIGNED and _rand(generator) < 0.5:
        v = -v
    _, h, w = img.shape
    near = InterpolationMode.NEAREST
    if op in ("ShearX", "ShearY"):
        # shear about the top-left corner, as a PIL affine with factor v (torchvision's AutoAugment does the same)
        deg = math.degrees(math.atan(v))
        shear = [deg, 0.0] if op == "ShearX" else [0.0, deg]
        return F.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=near, center=[0, 0])
    if op in ("TranslateX", "TranslateY"):
        shift = [int(round(v * w)), 0] if op == "TranslateX" else [0, int(round(v * h))]
        return F.affine(img, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], interpolation=near)
    if op == "Rotate":
        return F.rotate(img, v, interpolation=near)
    if op == "AutoContrast":
        return F.autocontrast(img)
    if op == "Invert":
        return F.invert(img)
    if op == "Equalize":
        return F.equalize(img)
    if op == "Solarize":
        return img if v > 255 else F.solarize(img, v)  # a threshold above 255 inverts nothing
    if op == "Posterize":
        return F.posterize(img, int(v))
    if op == "Contrast":
        return F.adjust_contrast(img, v)
    if op == "Color":
        return F.adjust_saturation(img, v)
    if op == "Brightness":
        return F.adjust_brightness(img, v)
    if op == "Sharpness":
        return F.adjust_sharpness(img, v)
    if op == "Cutout":
        side = int(v * w)
        if side <= 0:
            return img
        # the square's centre is uniform over the image; the square is clipped at the borders
        cy, cx = int(_rand(generator) * h), int(_rand(generator) * w)
        y0, x0 = max(0, cy - side // 2), max(0, cx - side // 2)
        out = img.clone()
        c = img.shape[0]
        fill = torch.tensor(CUTOUT_FILL if c == 3 else [sum(CUTOUT_FILL) // 3] * c, dtype=img.dtype).view(-1, 1, 1)
        out[:, y0:min(h, y0 + side), x0:min(w, x0 + side)] = fill
        return out
    raise KeyError(f"unknown Fast AutoAugment operation {op!r}")


class FastAutoAugment:
    """One sub-policy per image, drawn at random; each of its ops applied with its probability."""

    def __init__(self, policy: str | tuple[SubPolicy, ...] = "cifar10", generator: torch.Generator | None = None):
        if isinstance(policy, str):
            if policy not in POLICIES:
                from mvc.core.utils import MVCError
                raise MVCError(f"no Fast AutoAugment policy searched on {policy!r}; choose one of "
                               f"{', '.join(POLICIES)}")
            policy = POLICIES[policy]
        self.policy = policy
        self.generator = generator

    def __call__(self, img):
        from PIL import Image

        if isinstance(img, Image.Image):
            from torchvision.transforms import functional as F

            return F.to_pil_image(self(F.pil_to_tensor(img)), mode=img.mode)
        g = self.generator
        sub = self.policy[int(torch.randint(len(self.policy), (), generator=g))]
        for op, p, level in sub:
            if _rand(g) < p:
                img = apply_op(img, op, level, g)
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.policy)} sub-policies)"
