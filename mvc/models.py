"""The base pipeline MVC fine-tunes: loading its components, and the `conv_in` surgery.

`model.base` is 'tiny' (the locally pretrained tiny base, see `mvc.tiny.get_tiny_base`), a hub id
(e.g. `stable-diffusion-v1-5/stable-diffusion-v1-5`), or a local diffusers folder in the
text-to-image (StableDiffusionPipeline) or InstructPix2Pix layout. Each component is loaded with
its own diffusers / transformers class from its sub-folder, as safetensors.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from mvc.utils import MVCError

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


#################################################################################
#                                 Loading                                       #
#################################################################################

def _resolve_source(base: str) -> str:
    """A local folder (checked) or a hub id; a path-like string that is not a folder is an error."""
    p = Path(base).expanduser()
    if p.is_dir():
        missing = [c for c in COMPONENTS if not (p / c).is_dir()]
        if missing:
            raise MVCError(f"model.base {base!r} is not a diffusers pipeline folder: no {', '.join(missing)} "
                           "sub-folder(s); give a StableDiffusion or InstructPix2Pix folder")
        return str(p)
    if base.startswith((".", "/", "~")) or base.count("/") > 1 or p.exists():
        raise MVCError(f"model.base: no folder {base!r}; give 'tiny', a hub id like 'owner/name', or a diffusers folder")
    return base


def load_pipeline_components(base: str, revision: str | None = None, variant: str | None = None) -> dict:
    """unet, vae, text_encoder, tokenizer, scheduler (DDPM, for training) of a diffusers folder or hub id."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    src = _resolve_source(base)
    kw = {"revision": revision}
    wkw = {**kw, "variant": variant, "use_safetensors": True}
    try:
        out = {
            "tokenizer": CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **kw),
            "text_encoder": CLIPTextModel.from_pretrained(src, subfolder="text_encoder", **wkw),
            "vae": AutoencoderKL.from_pretrained(src, subfolder="vae", **wkw),
            "unet": UNet2DConditionModel.from_pretrained(src, subfolder="unet", **wkw),
            # training always uses DDPM noise; its config (betas, prediction type) comes from the base
            "scheduler": DDPMScheduler.from_pretrained(src, subfolder="scheduler", **kw),
        }
    except (OSError, ValueError, EnvironmentError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        offline = os.environ.get("HF_HUB_OFFLINE", "0")
        raise MVCError(f"cannot load the base pipeline {base!r}: {first} (HF_HUB_OFFLINE={offline}; "
                       "a local folder needs safetensors weights)") from None
    return out


def load_base_components(model_cfg: Any, tiny_cfg: Any = None, pool: Any = None,
                         output_dir: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """The base's unet, vae, text_encoder, tokenizer and scheduler (U-Net not yet widened).

    With `model_cfg.base == 'tiny'` the tiny base is built (or taken from its cache) from the
    remainder `pool` of the training set; call this under `accelerator.main_process_first()`.
    """
    if model_cfg.base == "tiny":
        from mvc.tiny import get_tiny_base

        if tiny_cfg is None or pool is None:
            raise MVCError("model.base=tiny needs the tiny config and the remainder pool (data.k_per_class must "
                           "leave images outside the labelled subset)")
        folder = get_tiny_base(tiny_cfg, pool, output_dir=output_dir, progress=progress)
        return load_pipeline_components(str(folder))
    return load_pipeline_components(model_cfg.base, revision=model_cfg.revision, variant=model_cfg.variant)


#################################################################################
#                               conv_in surgery                                 #
#################################################################################

def widen_conv_in(unet: Any, in_channels: int = 8) -> Any:
    """Give the U-Net's `conv_in` 8 input channels (noisy latent + condition latent), InstructPix2Pix-style.

    The first 4 input channels keep the pretrained weights, the new ones start at zero, so with a
    zero condition the widened U-Net computes exactly what the base did. Returns the same U-Net.
    """
    old = unet.conv_in
    have = old.in_channels
    if have == in_channels:
        return unet  # already an InstructPix2Pix U-Net
    if have * 2 != in_channels:
        raise MVCError(f"the base U-Net has {have} input channels; conv_in surgery expects {in_channels // 2} "
                       f"(text-to-image) or {in_channels} (InstructPix2Pix)")
    new = torch.nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                          dilation=old.dilation, groups=old.groups, bias=old.bias is not None,
                          padding_mode=old.padding_mode, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :have].copy_(old.weight)  # (out, in, k, k): old input channels first
        if old.bias is not None:
            new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=in_channels)
    return unet


#################################################################################
#                    SD-1.5 shapes (random weights, no download)                #
#################################################################################

# Written out from the published stable-diffusion-v1-5 unet/vae/text_encoder config.json files.
SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
SD15_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, act_fn="silu", norm_num_groups=32, scaling_factor=0.18215,
)
SD15_TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)


def build_sd15_shape(parts: tuple[str, ...] = ("unet", "vae", "text_encoder")) -> dict:
    """SD-1.5-shaped components with random weights, for shape tests and CPU benchmarks.

    The tokenizer is the tiny one with 77 positions (its ids lie inside CLIP's vocabulary).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from mvc.tiny import build_tiny_tokenizer

    out: dict = {}
    if "unet" in parts:
        out["unet"] = UNet2DConditionModel(**SD15_UNET_CONFIG)
    if "vae" in parts:
        out["vae"] = AutoencoderKL(**SD15_VAE_CONFIG)
    if "text_encoder" in parts:
        out["text_encoder"] = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG))
        out["tokenizer"] = build_tiny_tokenizer(max_length=77)
        out["scheduler"] = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                         beta_start=0.00085, beta_end=0.012, clip_sample=False)
    return out
