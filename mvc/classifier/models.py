"""Backbones by timm name, the CIFAR stem for 32x32 inputs, and preprocessing read from the model."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from mvc.core.perf import channels_last as to_channels_last
from mvc.core.utils import MVCError

SMALL_MAP_PIXELS = 4  # a feature map of at most this many pixels (2x2) is convolved as a matrix product on CPU


@dataclass
class ModelMeta:
    """Everything needed to rebuild a trained classifier and its preprocessing (stored in checkpoints)."""
    backbone: str
    num_classes: int
    cifar_stem: bool
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 1.0  # eval: resize to input_size / crop_pct then centre-crop (1.0: plain resize)
    channels_last: bool = False  # weights in channels-last memory format (checkpoints from before: False)

    def to_dict(self) -> dict:
        """A weights_only-safe dict (lists, not tuples)."""
        d = asdict(self)
        d["mean"], d["std"] = list(d["mean"]), list(d["std"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelMeta":
        """Inverse of `to_dict`."""
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})


def check_backbone(name: str) -> None:
    """MVCError unless `name` is a timm model name (checked before any data is loaded)."""
    import timm

    from mvc.classifier import zoo  # noqa: F401  (registers wrn28_10, wrn28_2, mvc_refcnn with timm; imported
    #                                  here, not at the top, so that config validation does not import timm)

    if not timm.is_model(name):
        raise MVCError(f"unknown backbone {name!r}: not a timm model name (see timm.list_models(), e.g. resnet18)")


def _create(name: str, pretrained: bool, num_classes: int, pretrained_key: str = "classifier.pretrained") -> nn.Module:
    """timm.create_model with one-line errors for unknown names and unreachable weights (`pretrained_key`: the
    config key that asked for them)."""
    import timm

    check_backbone(name)
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes)
    except Exception as e:  # offline hub, missing weights, bad kwargs
        if pretrained:
            raise MVCError(f"cannot load pretrained weights for {name!r} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                           f"set {pretrained_key}=false or make the weights available in the HF cache "
                           f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')})") from None
        raise MVCError(f"cannot build backbone {name!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


class SmallMapConv2d(nn.Conv2d):
    """`nn.Conv2d` that convolves a CPU feature map of at most `SMALL_MAP_PIXELS` pixels as one matrix product.

    The same sums in another order (outputs and gradients agree to float rounding). oneDNN's backward is slow on
    such maps: a 32-px resnet10t step spends a third of its time on the 2x2 and 1x1 maps of its last stages, and
    takes 1.7x less time this way (bench/bench_classifier_step.py). A 1x1 output uses only the kernel taps that
    touch the map (a 3x3 kernel on a 1x1 map: its centre); anything else (larger maps, CUDA, groups, dilation)
    is the plain convolution. Same parameters and state dict as `nn.Conv2d`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        if (h * w > SMALL_MAP_PIXELS or x.device.type != "cpu" or self.groups != 1 or self.dilation != (1, 1)
                or self.padding_mode != "zeros" or isinstance(self.padding, str)):
            return super().forward(x)
        (kh, kw), (ph, pw), (sh, sw) = self.kernel_size, self.padding, self.stride
        oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        if oh == ow == 1 and h + ph <= kh and w + pw <= kw:  # one output: the taps over the map, a linear layer
            taps = self.weight[:, :, ph:ph + h, pw:pw + w]
            return F.linear(x.flatten(1), taps.flatten(1), self.bias).view(n, self.out_channels, 1, 1)
        cols = F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)  # (N, C*kh*kw, oh*ow)
        out = torch.matmul(self.weight.reshape(self.out_channels, -1), cols)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1)
        return out.view(n, self.out_channels, oh, ow)


def use_small_map_convs(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Every plain `nn.Conv2d` of `model` becomes a `SmallMapConv2d` (`enabled=False`: back again; in place, same
    parameters and state dict)."""
    old, new = (nn.Conv2d, SmallMapConv2d) if enabled else (SmallMapConv2d, nn.Conv2d)
    for m in model.modules():
        if type(m) is old:
            m.__class__ = new
    return model


def apply_cifar_stem(model: nn.Module) -> nn.Module:
    """Adapt a stem that downsamples 4x (224-px ImageNet) to 32x32 inputs, in place.

    - ResNet family (timm `ResNet`: resnet*, wide_resnet*, resnext*, resnet10t...): a plain 7x7/2 `conv1`
      becomes 3x3/1 (freshly initialised); a deep stem keeps its convs but its first conv gets stride 1;
      `maxpool` becomes Identity. A 32x32 image then reaches stage 1 at 32x32 (not 8x8).
    - EfficientNet / MobileNet family (`conv_stem`): the stem conv gets stride 1 (2x less downsampling).
    - Anything else (VGG, Inception, ViT, ...): refused with an MVCError, since there is no single right
      surgery; set classifier.cifar_stem=false (and classifier.input_size for small images).
    """
    from timm.models.efficientnet import EfficientNet
    from timm.models.resnet import ResNet

    if isinstance(model, ResNet):
        if isinstance(model.conv1, nn.Conv2d):
            old = model.conv1
            model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, stride=1, padding=1, bias=False)
        else:  # deep stem: Sequential(conv, bn, act, conv, ...)
            first = next(m for m in model.conv1.modules() if isinstance(m, nn.Conv2d))
            first.stride = (1, 1)
        model.maxpool = nn.Identity()
        return model
    if isinstance(model, EfficientNet) or hasattr(model, "conv_stem") and isinstance(model.conv_stem, nn.Conv2d):
        model.conv_stem.stride = (1, 1)
        return model
    raise MVCError(f"classifier.cifar_stem is only implemented for ResNet and EfficientNet-style backbones, "
                   f"not {type(model).__name__}; set --classifier.cifar_stem=false")


def resolve_meta(model: nn.Module, backbone: str, num_classes: int, cifar_stem: bool, input_size: int | None) -> ModelMeta:
    """Preprocessing from `timm.data.resolve_model_data_config(model)`; `input_size` overrides the size
    (and then eval is a plain resize, no centre crop, since small images have no border to spare)."""
    from timm.data import resolve_model_data_config

    dc = resolve_model_data_config(model)
    size = int(input_size) if input_size else int(dc["input_size"][-1])
    crop = 1.0 if input_size else float(dc.get("crop_pct", 1.0) or 1.0)
    return ModelMeta(backbone=backbone, num_classes=int(num_classes), cifar_stem=bool(cifar_stem), input_size=size,
                     mean=tuple(float(x) for x in dc["mean"]), std=tuple(float(x) for x in dc["std"]), crop_pct=crop)


def build_model(backbone: str, num_classes: int, pretrained: bool = False, cifar_stem: bool = False,
                input_size: int | None = None, pretrained_key: str = "classifier.pretrained",
                channels_last: bool = False) -> tuple[nn.Module, ModelMeta]:
    """A timm classifier with `num_classes` outputs (0: pooled features) and its preprocessing meta; small maps
    convolved as matrix products on CPU (`SmallMapConv2d`), weights in channels-last format if asked."""
    model = _create(backbone, pretrained, num_classes, pretrained_key)
    if cifar_stem:
        apply_cifar_stem(model)
    to_channels_last(use_small_map_convs(model), channels_last)
    meta = resolve_meta(model, backbone, num_classes, cifar_stem, input_size)
    meta.channels_last = bool(channels_last)
    return model, meta


def build_from_meta(meta: ModelMeta) -> nn.Module:
    """Rebuild the (untrained) network described by `meta`, e.g. to load a checkpoint into it."""
    model, _ = build_model(meta.backbone, meta.num_classes, pretrained=False, cifar_stem=meta.cifar_stem,
                           input_size=meta.input_size, channels_last=meta.channels_last)
    return model


@torch.no_grad()
def extract_features(model: nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of a frozen backbone: (N, D) features and (N,) labels, on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    feats, labels = [], []
    for x, y, *_ in loader:
        feats.append(model.forward_head(model.forward_features(x.to(device)), pre_logits=True).float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)
