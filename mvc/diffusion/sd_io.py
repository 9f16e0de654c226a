"""Stable Diffusion inputs, prepared one way for every stage: images, prompts, and their encodings.

Fine-tuning caches, validation, generation, the tiny base and the benchmarks all call these
functions, so training and sampling cannot drift apart. Each one does what
`StableDiffusionInstructPix2PixPipeline` does, through diffusers' own `VaeImageProcessor` and the
pipeline's tokenizer settings:
- images: RGB, resized to (R, R) with the image processor's filter (Lanczos), scaled to [-1, 1];
- prompts: multi-vector textual-inversion tokens expanded, padded / truncated to the tokenizer's max
  length; the attention mask is passed to the text encoder only when its config asks for one (CLIP's
  does not);
- image latents: the posterior MODE (= mean) for conditions, as the pipeline's `argmax` does.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np
import torch

from mvc.core.utils import batched

#################################################################################
#                                    Images                                     #
#################################################################################


@functools.lru_cache(maxsize=8)
def image_processor(vae_scale_factor: int = 8):
    """diffusers' `VaeImageProcessor` with the settings the IP2P / SD pipelines use."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=vae_scale_factor)


def _rgb(image: Any):
    from mvc.data.images import to_rgb

    return to_rgb(image)


def resize(image: Any, resolution: int):
    """A PIL image as RGB at (resolution, resolution), resized with the pipeline's own filter."""
    im = _rgb(image)
    if im.size == (resolution, resolution):
        return im
    return image_processor().resize(im, resolution, resolution)


def images_to_tensor(images: Sequence[Any], resolution: int) -> torch.Tensor:
    """PIL images -> (B, 3, R, R) float32 in [-1, 1], exactly as the pipeline's `preprocess(height=R, width=R)`."""
    return image_processor().preprocess([_rgb(im) for im in images], height=resolution, width=resolution)


def images_to_uint8(images: Sequence[Any], resolution: int) -> torch.Tensor:
    """PIL images -> (B, 3, R, R) uint8, the same resize (for in-memory caches of many images)."""
    arr = np.stack([np.asarray(resize(im, resolution)) for im in images])  # (B, R, R, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def uint8_to_model(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1] with the same float ops as `images_to_tensor`."""
    return 2.0 * (x.float() / 255.0) - 1.0


def tensor_to_pil(x: torch.Tensor) -> list:
    """(B, 3, H, W) in [-1, 1] -> PIL images (the pipeline's postprocess)."""
    return image_processor().postprocess(x.detach().float().cpu(), output_type="pil")


@torch.no_grad()
def encode_images(vae: Any, x: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior (mean, std) of images (N, 3, R, R) in [-1, 1]: each (N, C, R/f, R/f) float32, unscaled.

    The mean is the condition latent the IP2P pipeline uses (`latent_dist.mode()`).
    """
    p = next(vae.parameters())
    means, stds = [], []
    for i in range(0, len(x), batch_size):
        dist = vae.encode(x[i:i + batch_size].to(device=p.device, dtype=p.dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


def encode_posteriors(vae: Any, images: Sequence[Any], resolution: int,
                      batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior (mean, std) of PIL images at `resolution`: each (N, C, h, w) float32, unscaled."""
    out = [encode_images(vae, images_to_tensor(chunk, resolution), batch_size)
           for chunk in batched(list(images), batch_size)]
    return torch.cat([m for m, _ in out]), torch.cat([s for _, s in out])


def encode_conditions(vae: Any, images: Sequence[Any], resolution: int, batch_size: int = 64) -> torch.Tensor:
    """Condition latents (N, C, h, w) of PIL images, in the VAE's dtype: what the IP2P pipeline feeds its U-Net."""
    return encode_posteriors(vae, images, resolution, batch_size)[0].to(next(vae.parameters()).dtype)


def sample_init_latents(vae: Any, mean: torch.Tensor, std: torch.Tensor,
                        generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Scaled initial latents (N, C, h, w) for img2img from posteriors (N, C, h, w): one posterior draw per
    image with its own generator, times the VAE's scaling factor, in the VAE's dtype and on its device.

    This is what `StableDiffusionImg2ImgPipeline.prepare_latents` does with a list of generators
    (`latent_dist.sample(generator[i])` per image, then `scaling_factor *`), so handing the result to
    the pipeline as `image` (4 channels: used as the latents) gives the pipeline's own images, while
    each source is encoded once however many variants it has.
    """
    p = next(vae.parameters())
    eps = torch.cat([torch.randn((1, *mean.shape[1:]), generator=g, device=g.device, dtype=p.dtype)
                     for g in generators]).to(p.device)  # (N, C, h, w), the draws diffusers' randn_tensor makes
    z = mean.to(p.device, p.dtype) + std.to(p.device, p.dtype) * eps
    return vae.config.scaling_factor * z


#################################################################################
#                                   Prompts                                     #
#################################################################################

def pipeline_texts(tokenizer: Any, texts: Sequence[str]) -> list[str]:
    """Prompts as the SD pipelines tokenize them: a multi-vector textual-inversion token `<t>` (added with `<t>_1`,
    `<t>_2`, ...) expanded to all its tokens by the pipelines' own `maybe_convert_prompt` (a no-op without
    added tokens)."""
    texts = list(texts)
    if any(not t.special for t in getattr(tokenizer, "added_tokens_decoder", {}).values()):
        from diffusers.loaders import TextualInversionLoaderMixin

        texts = TextualInversionLoaderMixin().maybe_convert_prompt(texts, tokenizer)
    return texts


def tokenize(tokenizer: Any, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask (N, T) int64 of `pipeline_texts`, padded / truncated to the tokenizer's
    max length."""
    texts = pipeline_texts(tokenizer, texts)
    unique = list(dict.fromkeys(texts))  # each distinct text once: a pool's captions repeat (5 s for 60,000)
    t = tokenizer(unique, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                  return_tensors="pt")
    if len(unique) == len(texts):
        return t.input_ids, t.attention_mask
    row = {text: i for i, text in enumerate(unique)}
    rows = torch.tensor([row[text] for text in texts], dtype=torch.long)
    return t.input_ids[rows], t.attention_mask[rows]


def text_hidden_states(text_encoder: Any, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Text-encoder hidden states (N, T, D) of token ids (N, T) on the encoder's device, with gradients when it
    trains (DreamBooth); the attention mask only when the encoder's config asks for it, as the SD pipelines do."""
    device = next(text_encoder.parameters()).device
    config = getattr(text_encoder, "module", text_encoder).config  # the model's own (under DDP: its wrapped module)
    use_mask = mask is not None and getattr(config, "use_attention_mask", False)
    return text_encoder(ids.to(device), attention_mask=mask.to(device) if use_mask else None)[0]


@torch.no_grad()
def encode_ids(text_encoder: Any, ids: torch.Tensor, mask: torch.Tensor | None = None,
               batch_size: int = 64) -> torch.Tensor:
    """Text-encoder hidden states (N, T, D) of token ids (N, T), in the encoder's dtype, on its device."""
    p = next(text_encoder.parameters())
    out = [text_hidden_states(text_encoder, ids[i:i + batch_size], None if mask is None else mask[i:i + batch_size])
           for i in range(0, len(ids), batch_size)]
    return torch.cat(out).to(p.dtype)


def encode_prompts(tokenizer: Any, text_encoder: Any, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Text-encoder hidden states (N, T, D) of prompts, exactly as the SD pipelines compute them."""
    return encode_ids(text_encoder, *tokenize(tokenizer, prompts), batch_size=batch_size)
