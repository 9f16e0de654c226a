"""Fine-tuning set-up: which U-Net weights train (full or LoRA), attention, optimizer, LR schedule, EMA."""

from __future__ import annotations

import importlib.util
from typing import Callable

import torch

from mvc.registry import Registry
from mvc.schedules import lambda_lr
from mvc.utils import MVCError

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the U-Net's attention projections
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # the CLIP text encoder's


#################################################################################
#                              Trainable weights                                #
#################################################################################

def freeze(*modules) -> None:
    """Frozen helpers (VAE, text encoder): no gradients, eval mode."""
    for m in modules:
        m.requires_grad_(False)
        m.eval()


ATTENTION: Registry[Callable] = Registry("attention implementation")


@ATTENTION.register("sdpa")
def _sdpa(unet) -> None:
    """torch's scaled_dot_product_attention (flash / memory-efficient kernels where available)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())


@ATTENTION.register("default")
def _default(unet) -> None:
    """diffusers' plain attention (explicit softmax)."""
    from diffusers.models.attention_processor import AttnProcessor

    unet.set_attn_processor(AttnProcessor())


@ATTENTION.register("xformers")
def _xformers(unet) -> None:
    """xformers' memory-efficient attention (must be installed; GPU)."""
    if importlib.util.find_spec("xformers") is None:
        raise MVCError("train.attention=xformers but xformers is not installed; "
                       "pip install xformers (GPU) or use train.attention=sdpa")
    unet.enable_xformers_memory_efficient_attention()


def set_attention(unet, kind: str) -> None:
    """Select the U-Net attention implementation by its `ATTENTION` name."""
    ATTENTION.get(kind)(unet)


def add_lora(model, rank: int, targets: list[str]) -> None:
    """Freeze `model` and give the `targets` modules trainable LoRA adapters of `rank` (peft; B starts at zero,
    so the model computes what it did)."""
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets))


def prepare_unet(unet, train_cfg, train_conv_in: bool = True) -> list[torch.nn.Parameter]:
    """Set attention / checkpointing / LoRA on the U-Net and return its trainable parameters.

    Full fine-tuning trains everything; with `lora_rank > 0` only the LoRA adapters (attention
    projections) and, when `train_conv_in`, `conv_in` (whose 4 new InstructPix2Pix input channels must be
    learned) train.
    """
    set_attention(unet, train_cfg.attention)
    if train_cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if train_cfg.lora_rank > 0:
        add_lora(unet, train_cfg.lora_rank, LORA_TARGETS)
        unet.conv_in.requires_grad_(train_conv_in)
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
            raise MVCError("train.use_8bit_adam=true needs bitsandbytes (pip install '.[adam8bit]'; GPU); "
                           "or set train.use_8bit_adam=false") from None
        return bnb.optim.Adam8bit(params, **kw)
    fused = train_cfg.fused_adam and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, **kw, fused=fused or None)


def build_lr_scheduler(optimizer, train_cfg):
    """The LR schedule (mvc.schedules) with warm-up, stepped once per optimizer step (never per process)."""
    return lambda_lr(optimizer, train_cfg.lr_scheduler, train_cfg.max_steps, train_cfg.lr_warmup_steps)


def build_ema(params: list[torch.nn.Parameter], decay: float):
    """diffusers' `EMAModel` of the trainable parameters ((1+n)/(10+n) warm-up of the decay, capped at `decay`)."""
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=decay)
