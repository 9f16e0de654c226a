"""What conditions the fine-tuned U-Net (`train.conditioning`): MVC's caption or a variant of the supplement's Fig. 4.

`caption` (MVC): the caption plus the class prompt. The supplement's alternatives (§2, Fig. 4): `photo_index`
("a photo i/n of type <class>"), `image` (the image's own embedding), `image_direction` (E(target) - E(condition);
at generation E(partner) - E(source), another image of the class) and `caption_shape` (the caption plus the
image's edge map through a ControlNet branch built from the U-Net and trained beside it). The image embedding is
the base's VAE posterior mean pooled to a g x g grid, lifted to the context width by a fixed orthonormal map,
after BOS in the empty prompt's embedding. Mixing edits these contexts as it edits a caption's.
docs/conditioning.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mvc.core.registry import config_rule, publish_choices
from mvc.core.utils import MVCError

CONDITIONINGS = ("caption", "photo_index", "image", "image_direction", "caption_shape")
IMAGE_CONDITIONINGS = ("image", "image_direction")
SHAPE = "caption_shape"  # the caption, and the edge map through a ControlNet branch
CONTROLNET_FOLDER = "controlnet"  # the branch's folder inside the fine-tuned pipeline folder
PHOTO_INDEX_TEMPLATE = "a photo {caption} of type {label}"  # the supplement's "A Photo 1/n of type 'class label'"
publish_choices("conditioning", CONDITIONINGS)


def photo_index_captions(labelled: Any) -> dict[str, str]:
    """{image id: 'i/n'}: each labelled image's 1-based number among its class's images (subset order), of n."""
    targets = np.asarray(labelled.targets)
    out = {}
    for c in np.unique(targets):
        members = np.flatnonzero(targets == c)
        out.update({str(labelled.ids[int(s)]): f"{i + 1}/{len(members)}" for i, s in enumerate(members)})
    return out


def token_grid(latent_size: int, max_length: int) -> int:
    """The side g of the image-token grid: g * g tokens fit between BOS and the last position, at most the latent's."""
    g = min(int(latent_size), math.isqrt(max(int(max_length) - 2, 0)))
    if g < 1:
        raise MVCError(f"an image embedding needs at least 3 context positions; the tokenizer has {max_length}")
    return g


def lift_matrix(channels: int, dim: int) -> torch.Tensor:
    """(C, D) fixed map from latent channels to the context width: orthonormal rows scaled by sqrt(D / C), so a
    unit-variance latent gives unit-variance context values, like a text encoder's normalised output."""
    if dim < channels:
        raise MVCError(f"the context width {dim} is smaller than the {channels} latent channels")
    gen = torch.Generator().manual_seed(0)  # fixed: the same map in training and generation, in every process
    q, _ = torch.linalg.qr(torch.randn(dim, channels, generator=gen, dtype=torch.float64))  # (D, C), orthonormal
    return (q.T * math.sqrt(dim / channels)).float()


def image_tokens(mean: torch.Tensor, scaling_factor: float, grid: int, dim: int) -> torch.Tensor:
    """Image embeddings (N, g*g, D) float32 of unscaled VAE posterior means (N, C, h, w)."""
    x = F.adaptive_avg_pool2d(mean.float() * scaling_factor, grid)  # (N, C, g, g)
    return x.flatten(2).transpose(1, 2) @ lift_matrix(int(mean.shape[1]), dim).to(x.device)  # (N, g*g, D)


def image_contexts(tokens: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """Contexts (b, L, D) in `empty`'s dtype: the empty prompt's embedding (L, D) with positions 1..n the tokens (b, n, D)."""
    n = int(tokens.shape[1])
    if n + 1 > int(empty.shape[0]):
        raise MVCError(f"{n} image tokens do not fit the {empty.shape[0]} context positions")
    out = empty[None].expand(len(tokens), -1, -1).clone()
    out[:, 1:1 + n] = tokens.to(out.dtype)
    return out


def image_window(grid: int) -> tuple[int, int]:
    """The context positions the image tokens occupy (what mixing may touch)."""
    return 1, 1 + grid * grid


@dataclass
class ImageContexts:
    """Per labelled image and orientation, its image tokens (N, F, n, D); a batch's contexts are looked up per pair."""
    tokens: torch.Tensor
    empty: torch.Tensor  # (L, D), the empty prompt's embedding
    direction: bool      # image_direction: E(target) - E(condition)

    @classmethod
    def build(cls, mean: torch.Tensor, scaling_factor: float, empty: torch.Tensor, direction: bool) -> "ImageContexts":
        """From the latent cache's means (N, F, C, h, w) and the empty prompt's embedding (L, D)."""
        N, Fl = int(mean.shape[0]), int(mean.shape[1])
        grid = token_grid(int(mean.shape[-1]), int(empty.shape[0]))
        tok = image_tokens(mean.flatten(0, 1), scaling_factor, grid, int(empty.shape[1]))
        return cls(tok.reshape(N, Fl, *tok.shape[1:]), empty, direction)

    @property
    def grid(self) -> int:
        return math.isqrt(int(self.tokens.shape[2]))

    @property
    def nbytes(self) -> int:
        return self.tokens.numel() * self.tokens.element_size()

    def lookup(self, cond_idx: torch.Tensor, target_idx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """Contexts (b, L, D) of pairs: the target's embedding, or with `direction` target minus condition."""
        tok = self.tokens[target_idx, flip]
        if self.direction:
            tok = tok - self.tokens[cond_idx, flip]
        return image_contexts(tok, self.empty)


#################################################################################
#                      The shape condition (ControlNet-style)                   #
#################################################################################

def shape_maps(x: torch.Tensor) -> torch.Tensor:
    """Edge maps (N, 1, R, R) in [0, 1] of images (N, 3, R, R) in [-1, 1]: the Sobel gradient magnitude of the
    grey image, each divided by its largest value (a flat image has none)."""
    grey = x.float().mean(1, keepdim=True)
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device)
    k = torch.stack([kx, kx.T])[:, None]  # (2, 1, 3, 3)
    g = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), k)  # (N, 2, R, R)
    mag = g.pow(2).sum(1, keepdim=True).sqrt()
    return mag / mag.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)


def build_controlnet(unet: Any, vae_scale_factor: int):
    """A ControlNet branch copied from `unet` (its encoder's weights; zero-initialised outputs, so the pair starts
    as the U-Net alone) reading a 1-channel map at pixel resolution, downsampled `vae_scale_factor` times."""
    from diffusers import ControlNetModel

    steps = int(math.log2(int(vae_scale_factor)))
    if 2 ** steps != int(vae_scale_factor) or steps > 3:
        raise MVCError(f"a shape condition needs a VAE scale factor of 1, 2, 4 or 8, not {vae_scale_factor}")
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96, 256)[:steps + 1],
                                     conditioning_channels=1)


class ShapeControlledUNet(torch.nn.Module):
    """The U-Net with its ControlNet branch, called as the U-Net is: the shape map comes as `controlnet_cond`
    (training) or from `.shape` (set per batch at sampling; tiled over the pipeline's guidance chunks); without
    either the map is blank."""

    def __init__(self, unet: Any, controlnet: Any, vae_scale_factor: int):
        super().__init__()
        self.unet, self.controlnet, self.scale = unet, controlnet, int(vae_scale_factor)
        self.shape: torch.Tensor | None = None

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()
        self.controlnet.enable_gradient_checkpointing()

    def forward(self, sample, timestep, encoder_hidden_states=None, controlnet_cond=None, return_dict=True, **kw):
        cond = controlnet_cond if controlnet_cond is not None else self.shape
        if cond is None:
            size = int(sample.shape[-1]) * self.scale
            cond = torch.zeros(len(sample), 1, size, size, device=sample.device)
        if len(cond) != len(sample):
            cond = cond.repeat(len(sample) // len(cond), 1, 1, 1)
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                    controlnet_cond=cond.to(sample.device, sample.dtype), return_dict=False)
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         down_block_additional_residuals=down, mid_block_additional_residual=mid,
                         return_dict=return_dict, **kw)


def load_controlnet(model_dir: Any, unet: Any, vae_scale_factor: int, device: Any = None,
                    dtype: torch.dtype | None = None) -> ShapeControlledUNet:
    """The fine-tuned U-Net with its ControlNet branch from `<model_dir>/controlnet` (safetensors)."""
    from pathlib import Path

    from diffusers import ControlNetModel

    path = Path(model_dir) / CONTROLNET_FOLDER
    if not (path / "config.json").is_file():
        raise MVCError(f"{model_dir} was fine-tuned with a shape condition but has no {CONTROLNET_FOLDER}/ folder; "
                       "fine-tune again")
    net = ControlNetModel.from_pretrained(path, **({"torch_dtype": dtype} if dtype is not None else {}))
    out = ShapeControlledUNet(unet, net, vae_scale_factor).eval()
    return out.to(device) if device is not None else out


def edits_missing_tokens(conditioning: str, mixing: Any) -> bool:
    """Whether `mixing` (a MixingConfig) would edit token ids that `conditioning` does not have: an image
    conditioning with a coarse op at the token stage."""
    coarse = any("coarse" in [p.strip() for p in str(op).split("+")] for op in mixing.ops)
    return conditioning in IMAGE_CONDITIONINGS and coarse and mixing.coarse_stage == "tokens"


@config_rule("train.conditioning", names_keys=True)
def _conditioning(cfg: Any) -> None:
    """What a conditioning cannot be combined with, refused when the config is built (not after fine-tuning)."""
    t, m = cfg.train, cfg.mixing
    if t.conditioning == SHAPE and t.lora_rank > 0:
        raise MVCError("config keys train.conditioning and train.lora_rank: caption_shape trains its ControlNet branch "
                       "fully beside the U-Net; set train.lora_rank=0")
    if edits_missing_tokens(t.conditioning, m):
        raise MVCError(f"config keys train.conditioning and mixing.coarse_stage: {t.conditioning} conditions on image "
                       "embeddings, which have no token ids to edit; set mixing.coarse_stage=embeds")
