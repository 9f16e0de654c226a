"""Pipelines in and out: the base's components, the `conv_in` surgery, and the fine-tuned IP2P folder.

- In: a hub id or a local diffusers folder (text-to-image or InstructPix2Pix layout); each component is loaded
  with its own diffusers / transformers class from its sub-folder, as safetensors.
- Out: the fine-tuned model is a plain `StableDiffusionInstructPix2PixPipeline` folder plus
  `mvc_training.json`, which records the resolution it was tuned at (generation samples at it; the U-Net's
  `sample_size` agrees). DreamBooth's model is a plain `StableDiffusionPipeline` folder with the same file
  (`save_txt2img_folder`), sampled like the baselines.
- Samplers: the diffusers schedulers `generate.scheduler` names (`SAMPLERS`); baselines: the base sampled as it
  is, as diffusers' text-to-image or img2img pipeline (`base_pipeline`).
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from mvc.core.registry import Registry, publish_choices
from mvc.core.utils import MVCError, atomic_dir, clean_stale_temps

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
TRAINING_FILE = "mvc_training.json"


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
        raise _load_error(base, e) from None
    return out


def load_vae(base: str, revision: str | None = None, variant: str | None = None) -> Any:
    """The base's VAE alone (AutoencoderKL, safetensors) from a diffusers folder or hub id."""
    from diffusers import AutoencoderKL

    src = _resolve_source(base)
    try:
        return AutoencoderKL.from_pretrained(src, subfolder="vae", revision=revision, variant=variant,
                                             use_safetensors=True)
    except (OSError, ValueError, EnvironmentError) as e:
        raise _load_error(base, e) from None


def _load_error(base: str, e: Exception) -> MVCError:
    """One line for a base that cannot be loaded: the library's first line, and whether the hub is offline."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    offline = os.environ.get("HF_HUB_OFFLINE", "0")
    return MVCError(f"cannot load the base pipeline {base!r}: {first} (HF_HUB_OFFLINE={offline}; "
                    "a local folder needs safetensors weights)")


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
#                                   Samplers                                    #
#################################################################################

# config name -> (diffusers scheduler class, extra kwargs)
SAMPLERS: Registry[tuple[str, dict]] = Registry("sampler")
publish_choices("sampler", SAMPLERS)
SAMPLERS.register("euler_ancestral")(("EulerAncestralDiscreteScheduler", {}))
SAMPLERS.register("euler")(("EulerDiscreteScheduler", {}))
SAMPLERS.register("ddim")(("DDIMScheduler", {}))
SAMPLERS.register("dpmpp")(("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}))


def build_sampler(name: str, config: Any):
    """The diffusers scheduler named `name` (`generate.scheduler`), built from a pipeline's scheduler config."""
    import diffusers

    cls_name, kw = SAMPLERS.get(name)
    return getattr(diffusers, cls_name).from_config(config, **kw)


#################################################################################
#                     The base, sampled as it is (baselines)                    #
#################################################################################

# generate.method -> the diffusers pipeline that samples the base without fine-tuning
BASE_PIPELINES = {"txt2img": "StableDiffusionPipeline", "img2img": "StableDiffusionImg2ImgPipeline"}


def base_pipeline(components: dict, kind: str = "txt2img", sampler: str = "euler_ancestral"):
    """diffusers' StableDiffusionPipeline ('txt2img') or StableDiffusionImg2ImgPipeline ('img2img') from the
    base's components (`load_pipeline_components`), with the chosen sampler and no safety checker."""
    import diffusers

    unet, vae = components["unet"], components["vae"]
    if unet.config.in_channels != vae.config.latent_channels:
        raise MVCError(f"the base U-Net takes {unet.config.in_channels} input channels, not "
                       f"{vae.config.latent_channels}: it is not a text-to-image model (an InstructPix2Pix folder?); "
                       "give a StableDiffusion base as model.base")
    cls = getattr(diffusers, BASE_PIPELINES[kind])
    pipe = cls(vae=vae, text_encoder=components["text_encoder"], tokenizer=components["tokenizer"], unet=unet,
               scheduler=build_sampler(sampler, components["scheduler"].config),
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def base_identity(base: str, model_cfg: Any) -> dict:
    """What names a base in settings and records: a local folder by its resolved path, a hub id with the
    `model.revision` and `model.variant` it is loaded with."""
    p = Path(base).expanduser()
    if p.is_dir():
        return {"base": str(p.resolve())}
    return {"base": base, "revision": model_cfg.revision, "variant": model_cfg.variant}


def sample_txt2img(pipe, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor, generators: list,
                   resolution: int, num_inference_steps: int, guidance_scale: float) -> list:
    """One StableDiffusionPipeline call: (B, T, D) prompt and negative embeddings, B generators -> B PIL images
    at resolution x resolution (each image's noise from its own generator, whatever the batch)."""
    return pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, height=resolution,
                width=resolution, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                generator=generators, output_type="pil").images


def base_resolution(base: str, revision: str | None = None) -> int:
    """The native pixel size of a base (U-Net sample size x VAE factor), from its config files only."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    src = _resolve_source(base)
    try:
        unet = UNet2DConditionModel.load_config(src, subfolder="unet", revision=revision)
        vae = AutoencoderKL.load_config(src, subfolder="vae", revision=revision)
    except (OSError, ValueError, EnvironmentError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MVCError(f"cannot read the base pipeline {base!r}: {first} "
                       f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')})") from None
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


#################################################################################
#                          The fine-tuned IP2P folder                           #
#################################################################################

def ip2p_pipeline(components: dict, unet: Any, sampler: str = "euler_ancestral"):
    """A StableDiffusionInstructPix2PixPipeline from the components with `unet` (no safety checker)."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=components["vae"], text_encoder=components["text_encoder"], tokenizer=components["tokenizer"],
        unet=unet, scheduler=build_sampler(sampler, components["scheduler"].config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def export_unet(unet: Any, ema: Any = None, resolution: int | None = None, vae_scale_factor: int = 8):
    """A plain (LoRA merged) copy of the U-Net for saving: the EMA weights when given, `sample_size` set
    to the training resolution in latents."""
    out = copy.deepcopy(unet)
    if ema is not None:
        ema.copy_to([p for p in out.parameters() if p.requires_grad])
    if getattr(out, "peft_config", None):
        out.fuse_lora()    # W <- W + scale * B @ A in every adapted layer
        out.unload_lora()  # drop the adapter modules, keeping the merged weights
    if resolution is not None:  # (a U-Net with a ControlNet branch: the U-Net's own config)
        getattr(out, "unet", out).register_to_config(sample_size=int(resolution) // int(vae_scale_factor))
    out.requires_grad_(False)
    out.eval()
    return out


def export_text_encoder(text_encoder: Any):
    """A plain copy of a (LoRA-adapted) text encoder for saving: every adapter merged into its weights."""
    out = copy.deepcopy(text_encoder)
    if getattr(out, "peft_config", None):
        from diffusers.utils import recurse_remove_peft_layers
        from peft.tuners.tuners_utils import BaseTunerLayer

        for m in out.modules():
            if isinstance(m, BaseTunerLayer):
                m.merge()  # W <- W + scale * B @ A
        recurse_remove_peft_layers(out)  # each adapted layer -> its (merged) base layer
        del out.peft_config
        out._hf_peft_config_loaded = False  # else save_pretrained would write the adapter only
    out.requires_grad_(False)
    out.eval()
    return out


def _save_folder(out_dir: str | os.PathLike, pipe: Any, training: dict, extra: dict | None = None) -> Path:
    """Save `pipe` (safetensors), the `extra` models beside it ({subfolder: model}) and `mvc_training.json`
    atomically: temp folder, rename."""
    out_dir = Path(out_dir)
    clean_stale_temps(out_dir.parent, out_dir.name)
    with atomic_dir(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for name, model in (extra or {}).items():
            model.save_pretrained(tmp / name, safe_serialization=True)
        (tmp / TRAINING_FILE).write_text(json.dumps(training, indent=2, default=str) + "\n")
    return out_dir


def save_ip2p_folder(out_dir: str | os.PathLike, components: dict, unet: Any, training: dict,
                     ema: Any = None) -> Path:
    """Save the fine-tuned IP2P pipeline (safetensors) and `mvc_training.json` atomically; a U-Net with a
    ControlNet branch (train.conditioning=caption_shape) saves the branch in `controlnet/`."""
    exported = export_unet(unet, ema, training.get("resolution"), vae_scale_factor(components["vae"]))
    extra = {}
    if hasattr(exported, "controlnet"):
        extra["controlnet"], exported = exported.controlnet, exported.unet
    return _save_folder(out_dir, ip2p_pipeline(components, exported), training, extra)


def save_txt2img_folder(out_dir: str | os.PathLike, components: dict, unet: Any, text_encoder: Any,
                        training: dict) -> Path:
    """Save a fine-tuned text-to-image model (DreamBooth) as a StableDiffusionPipeline folder (LoRA merged, the
    U-Net's sample size at the training resolution, the training scheduler) with `mvc_training.json`."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=components["vae"], text_encoder=export_text_encoder(text_encoder), tokenizer=components["tokenizer"],
        unet=export_unet(unet, None, training.get("resolution"), vae_scale_factor(components["vae"])),
        scheduler=components["scheduler"], safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return _save_folder(out_dir, pipe, training)


def vae_scale_factor(vae: Any) -> int:
    """Pixel size / latent size of a VAE (what the pipelines compute)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def training_info(model_dir: str | os.PathLike) -> dict:
    """`mvc_training.json` of a fine-tuned folder ({} for a folder made elsewhere)."""
    p = Path(model_dir) / TRAINING_FILE
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except ValueError:
        raise MVCError(f"{p} is not valid JSON; fine-tune again or delete the file") from None


def load_ip2p_pipeline(model_dir: str | os.PathLike, sampler: str = "euler_ancestral", device: Any = None,
                       dtype: torch.dtype | None = None):
    """The fine-tuned `StableDiffusionInstructPix2PixPipeline` folder, with the chosen sampler."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    path = Path(model_dir)
    if not (path / "model_index.json").is_file():
        raise MVCError(f"no fine-tuned pipeline at {path} (model_index.json missing); run train_mvc.py first "
                       f"or set generate.model_dir")
    # torch_dtype works in every diffusers release we support (>= 0.31); recent ones prefer `dtype` and warn
    kw = {"torch_dtype": dtype} if dtype is not None else {}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
                path, safety_checker=None, feature_extractor=None, requires_safety_checker=False, **kw)
    except (OSError, ValueError, KeyError) as e:
        raise MVCError(f"cannot load the pipeline at {path}: {str(e).splitlines()[0]}") from None
    if pipe.unet.config.in_channels != 2 * pipe.vae.config.latent_channels:
        raise MVCError(f"{path}: the U-Net takes {pipe.unet.config.in_channels} input channels, not "
                       f"{2 * pipe.vae.config.latent_channels}; is it an InstructPix2Pix (MVC fine-tuned) model?")
    if pipe.vae.config.latent_channels != 4:
        raise MVCError(f"{path}: the InstructPix2Pix pipeline needs a VAE with 4 latent channels")
    pipe.scheduler = build_sampler(sampler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if device is not None:
        pipe.to(device)
    return pipe


def pipeline_resolution(model_dir: str | os.PathLike, pipe: Any) -> int:
    """The resolution a fine-tuned folder was tuned at (mvc_training.json), else its U-Net's native size."""
    res = training_info(model_dir).get("resolution")
    return int(res) if res else int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


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

    from mvc.diffusion.tokenizer import build_tiny_tokenizer

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
