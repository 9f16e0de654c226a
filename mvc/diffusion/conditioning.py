"""What the fine-tuned U-Net reads through cross-attention (`train.conditioning`): MVC's caption or a Fig. 4 variant.

`caption` (MVC): the caption plus the class prompt. The supplement's alternatives (§2, Fig. 4): `photo_index`
("a photo i/n of type <class>"), `image` (the image's own embedding) and `image_direction` (the editing
direction E(target) - E(condition); at generation E(partner) - E(source), the partner another image of the class).
The image embedding is the base's VAE posterior mean pooled to a g x g grid, each cell's channels lifted to the
context width by a fixed orthonormal map, placed after BOS in the empty prompt's embedding: every profile has it,
and the U-Net learns to read it while it is fine-tuned. Mixing edits these contexts as it edits a caption's.
docs/conditioning.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mvc.core.registry import publish_choices
from mvc.core.utils import MVCError

CONDITIONINGS = ("caption", "photo_index", "image", "image_direction")
IMAGE_CONDITIONINGS = ("image", "image_direction")
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
