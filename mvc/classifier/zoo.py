"""Backbones timm does not ship, registered with timm so that `classifier.backbone` takes their names.

- `wrn28_10`, `wrn28_2`: Wide ResNets for 32x32 images (Zagoruyko and Komodakis, 2016), the backbone of
  the CIFAR augmentation papers MVC compares against (AutoAugment, Fast AutoAugment, RandAugment).
- `mvc_refcnn`: a small, fast CNN (0.24 M parameters) for small images; the default reference
  classifier of the synthetic-set evaluation on the tiny profile (it trains on all 60,000
  Fashion-MNIST images in under three minutes on two CPU cores).

Each model follows timm's interface (`forward_features`, `forward_head(pre_logits=...)`,
`get_classifier`, `reset_classifier`, `num_features`, `pretrained_cfg`), so `timm.create_model`,
`resolve_model_data_config` and feature extraction treat it like any timm model. None has
pretrained weights.
"""

from __future__ import annotations

import torch
from timm.models import register_model
from torch import nn
from torch.nn import functional as F


def _cfg(input_size: int, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)) -> dict:
    """A timm pretrained_cfg without weights: the input size and normalisation the model expects."""
    return {"input_size": (3, input_size, input_size), "mean": mean, "std": std, "crop_pct": 1.0,
            "interpolation": "bilinear", "num_classes": 1000, "first_conv": "stem", "classifier": "fc"}


class _Head(nn.Module):
    """Shared timm-style head: global average pool -> (dropout) -> linear; `num_classes=0` gives features."""

    num_features: int
    fc: nn.Module

    def _init_head(self, num_features: int, num_classes: int, drop_rate: float) -> None:
        self.num_features = num_features
        self.drop_rate = drop_rate
        self.fc = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.num_classes = num_classes

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, C)
        if pre_logits:
            return x
        x = F.dropout(x, self.drop_rate, self.training) if self.drop_rate else x
        return self.fc(x)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


#################################################################################
#                                 Wide ResNet                                   #
#################################################################################

class _WideBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-(dropout)-BN-ReLU-conv3x3, projection shortcut on change."""

    def __init__(self, cin: int, cout: int, stride: int, drop: float):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.drop = drop
        self.short = nn.Conv2d(cin, cout, 1, stride, bias=False) if (cin != cout or stride != 1) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        shortcut = self.short(o) if self.short is not None else x
        o = self.conv1(o)
        o = F.relu(self.bn2(o))
        o = F.dropout(o, self.drop, self.training) if self.drop else o
        return self.conv2(o) + shortcut


class WideResNet(_Head, nn.Module):
    """WRN-d-k for 32x32 inputs: a 3x3 stem, three groups of (d-4)/6 blocks of widths 16k, 32k, 64k."""

    def __init__(self, depth: int = 28, widen: int = 10, num_classes: int = 10, drop_rate: float = 0.0,
                 block_drop: float = 0.3, in_chans: int = 3, **_):
        nn.Module.__init__(self)
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        layers, cin = [], widths[0]
        for g, (w, stride) in enumerate(zip(widths[1:], (1, 2, 2))):
            for i in range(n):
                layers.append(_WideBlock(cin, w, stride if i == 0 else 1, block_drop))
                cin = w
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self._init_head(cin, num_classes, drop_rate)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        self.pretrained_cfg = self.default_cfg = _cfg(32)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.blocks(self.stem(x))))  # (B, 64k, H/4, W/4)


@register_model
def wrn28_10(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-28-10 (36.5 M parameters), the CIFAR backbone of AutoAugment / RandAugment."""
    if pretrained:
        raise ValueError("wrn28_10 has no pretrained weights")
    return WideResNet(28, 10, **kwargs)


@register_model
def wrn28_2(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-28-2 (1.5 M parameters)."""
    if pretrained:
        raise ValueError("wrn28_2 has no pretrained weights")
    return WideResNet(28, 2, **kwargs)


#################################################################################
#                              The small reference CNN                          #
#################################################################################

def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class RefCNN(_Head, nn.Module):
    """Four 3x3 conv-BN-ReLU layers (32 | 64 | 128 | 128), a 2x max-pool after each of the first three:
    128 features. Pooling early keeps it fast on a CPU (about 1,500 images/s trained, 28 px, 2 cores)."""

    def __init__(self, num_classes: int = 10, drop_rate: float = 0.2, in_chans: int = 3, **_):
        nn.Module.__init__(self)
        self.stem = nn.Sequential(_conv_bn(in_chans, 32), nn.MaxPool2d(2), _conv_bn(32, 64), nn.MaxPool2d(2),
                                  _conv_bn(64, 128), nn.MaxPool2d(2), _conv_bn(128, 128))
        self._init_head(128, num_classes, drop_rate)
        self.pretrained_cfg = self.default_cfg = _cfg(32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)  # (B, 128, H/8, W/8)


@register_model
def mvc_refcnn(pretrained: bool = False, **kwargs) -> RefCNN:
    """The small reference CNN (for 28-32 px images)."""
    if pretrained:
        raise ValueError("mvc_refcnn has no pretrained weights")
    return RefCNN(**kwargs)
