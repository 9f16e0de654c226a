"""Fine-tuning set-up: which U-Net weights train (full or LoRA), attention, optimizer, LR schedule,
EMA, and the final diffusers folder."""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
from pathlib import Path

import torch

from mvc.utils import MVCError

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


#################################################################################
#                              Trainable weights                                #
#################################################################################

def freeze(*modules) -> None:
    """Frozen helpers (VAE, text encoder): no gradients, eval mode."""
    for m in modules:
        m.requires_grad_(False)
        m.eval()


def set_attention(unet, kind: str) -> None:
    """Select the U-Net attention implementation: 'sdpa', 'xformers' (must be installed) or 'default'."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if kind == "sdpa":
        unet.set_attn_processor(AttnProcessor2_0())
    elif kind == "default":
        unet.set_attn_processor(AttnProcessor())
    elif kind == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise MVCError("train.attention=xformers but xformers is not installed; "
                           "pip install xformers (GPU) or use train.attention=sdpa")
        unet.enable_xformers_memory_efficient_attention()
    else:
        raise MVCError(f"unknown train.attention {kind!r}; choose sdpa, xformers or default")


def prepare_unet(unet, train_cfg) -> list[torch.nn.Parameter]:
    """Set attention / checkpointing / LoRA on the U-Net and return its trainable parameters.

    Full fine-tuning trains everything; with `lora_rank > 0` only the LoRA adapters (attention
    projections) and `conv_in` (whose 4 new input channels must be learned) train.
    """
    set_attention(unet, train_cfg.attention)
    if train_cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if train_cfg.lora_rank > 0:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=train_cfg.lora_rank, lora_alpha=train_cfg.lora_rank,
                                    init_lora_weights="gaussian", target_modules=LORA_TARGETS))
        unet.conv_in.requires_grad_(True)
    else:
        unet.requires_grad_(True)
    unet.train()
    return [p for p in unet.parameters() if p.requires_grad]


def trainable_state_dict(unet) -> dict[str, torch.Tensor]:
    """The trainable tensors of the U-Net by name (CPU clones), what a checkpoint stores."""
    return {n: p.detach().cpu().clone() for n, p in unet.named_parameters() if p.requires_grad}


def load_trainable_state_dict(unet, state: dict[str, torch.Tensor]) -> None:
    """Copy a `trainable_state_dict` back, refusing a checkpoint of another set-up (e.g. LoRA vs full)."""
    names = {n for n, p in unet.named_parameters() if p.requires_grad}
    if names != set(state):
        raise MVCError("the checkpoint's trainable U-Net weights do not match this run "
                       "(different train.lora_rank or base model?); resume with the same config")
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v)


#################################################################################
#                           Optimizer and LR schedule                           #
#################################################################################

def build_optimizer(params: list[torch.nn.Parameter], train_cfg) -> torch.optim.Optimizer:
    """Adam (paper: lr 1e-4), fused by default, or bitsandbytes' 8-bit Adam when asked (imported lazily).

    The fused kernel updates all weights in one pass; on the SD-1.5 U-Net (CPU) its step takes about
    a fifth of the default Adam's (bench/bench_finetune.py). It needs floating-point weights on
    CPU or CUDA, else the default Adam runs.
    """
    kw = dict(lr=train_cfg.lr, betas=(train_cfg.adam_beta1, train_cfg.adam_beta2), weight_decay=train_cfg.weight_decay)
    if train_cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise MVCError("train.use_8bit_adam=true needs bitsandbytes (pip install bitsandbytes; GPU only); "
                           "or set train.use_8bit_adam=false") from None
        return bnb.optim.Adam8bit(params, **kw)
    fused = train_cfg.fused_adam and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, **kw, fused=fused or None)


def build_lr_scheduler(optimizer, train_cfg):
    """diffusers' LR schedule with warm-up, stepped once per optimizer step (never per process)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(train_cfg.lr_scheduler, optimizer, num_warmup_steps=train_cfg.lr_warmup_steps,
                         num_training_steps=train_cfg.max_steps)


#################################################################################
#                                      EMA                                      #
#################################################################################

class EMA:
    """Exponential moving average of the trainable parameters, with the usual (1+n)/(10+n) warm-up."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.decay = decay
        self.num_updates = 0
        self.shadow = [p.detach().clone().float() for p in params]

    def effective_decay(self) -> float:
        """Decay used at the next update (small early, so the EMA does not stick to the start)."""
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, params: list[torch.nn.Parameter]) -> None:
        """shadow <- d * shadow + (1 - d) * param."""
        d = self.effective_decay()
        for s, p in zip(self.shadow, params):
            s.lerp_(p.detach().float(), 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, params: list[torch.nn.Parameter]) -> None:
        """Write the averaged weights into `params`."""
        for s, p in zip(self.shadow, params):
            p.copy_(s.to(p.dtype))

    def state_dict(self) -> dict:
        """Plain tensors and numbers (weights_only-loadable)."""
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict`."""
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        self.shadow = [s.to(o.device) for s, o in zip(state["shadow"], self.shadow)]


#################################################################################
#                                 Final folder                                  #
#################################################################################

def export_unet(unet, ema: EMA | None = None):
    """A plain (LoRA merged) copy of the U-Net, with the EMA weights when given, for saving."""
    out = copy.deepcopy(unet)
    if ema is not None:
        ema.copy_to([p for p in out.parameters() if p.requires_grad])
    if getattr(out, "peft_config", None):
        out.fuse_lora()    # W <- W + scale * B @ A in every adapted layer
        out.unload_lora()  # drop the adapter modules, keeping the merged weights
    out.requires_grad_(False)
    out.eval()
    return out


def ip2p_pipeline(components: dict, unet):
    """A StableDiffusionInstructPix2PixPipeline from the components with `unet` (Euler-ancestral sampler)."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=components["vae"], text_encoder=components["text_encoder"], tokenizer=components["tokenizer"],
        unet=unet, scheduler=EulerAncestralDiscreteScheduler.from_config(components["scheduler"].config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_final_pipeline(out_dir: str | os.PathLike, components: dict, unet, ema: EMA | None = None) -> Path:
    """Save the InstructPix2Pix pipeline folder (safetensors) atomically: temp folder, then rename."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        ip2p_pipeline(components, export_unet(unet, ema)).save_pretrained(tmp, safe_serialization=True)
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out_dir
