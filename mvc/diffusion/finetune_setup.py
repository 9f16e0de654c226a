"""Fine-tuning set-up: which U-Net weights train (full or LoRA), attention, optimizer, LR schedule, EMA, and
whether gradient checkpointing is needed (`needs_checkpointing`)."""

from __future__ import annotations

import importlib.util
import logging
from typing import Callable

import torch

from mvc.core.registry import Registry, publish_choices
from mvc.core.schedules import lambda_lr
from mvc.core.utils import MVCError

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the U-Net's attention projections
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # the CLIP text encoder's

log = logging.getLogger(__name__)


#################################################################################
#                              Trainable weights                                #
#################################################################################

def freeze(*modules) -> None:
    """Frozen helpers (VAE, text encoder): no gradients, eval mode."""
    for m in modules:
        m.requires_grad_(False)
        m.eval()


ATTENTION: Registry[Callable] = Registry("attention implementation")
publish_choices("attention", ATTENTION)


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

def build_adam(params: list[torch.nn.Parameter], train_cfg) -> torch.optim.Optimizer:
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
    """The LR schedule (mvc.core.schedules) with warm-up, stepped once per optimizer step (never per process)."""
    return lambda_lr(optimizer, train_cfg.lr_scheduler, train_cfg.max_steps, train_cfg.lr_warmup_steps)


def build_ema(params: list[torch.nn.Parameter], decay: float, foreach: bool = False):
    """diffusers' `EMAModel` of the trainable parameters ((1+n)/(10+n) warm-up of the decay, capped at `decay`);
    `foreach`: its multi-tensor update (a few kernel launches per step instead of three per tensor)."""
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=decay, foreach=foreach)


#################################################################################
#                   Gradient checkpointing only when memory needs it            #
#################################################################################

MEMORY_MARGIN = 0.85  # of the free memory a step may plan to use: kernels' workspaces and fragmentation need room


def step_memory_need(peak_one: int, peak_two: int, rows: int, state_bytes: int) -> int:
    """Bytes a training step of `rows` rows needs, from the peaks of probe steps on one and on two rows (each
    above the memory in use before it; both hold the gradients and the weights' autocast copies once, the
    activations once per row) plus `state_bytes` not yet allocated (optimizer state, EMA, DDP buckets)."""
    per_row = max(peak_two - peak_one, 0)
    return peak_one + per_row * (rows - 1) + state_bytes


def probe_step_peak(unet, rows: int, latent_size: tuple[int, ...], text_shape: tuple[int, int],
                    text_dtype: torch.dtype, autocast) -> int:
    """Peak CUDA bytes above the current allocation of one forward + backward of `unet` on `rows` zero rows
    under `autocast` (a context-manager factory); the gradients are dropped afterwards, the weights untouched."""
    device = next(unet.parameters()).device
    x = torch.zeros(rows, unet.config.in_channels, *latent_size, device=device)
    emb = torch.zeros(rows, *text_shape, device=device, dtype=text_dtype)
    t = torch.zeros(rows, dtype=torch.long, device=device)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        with autocast():
            out = unet(x, t, encoder_hidden_states=emb, return_dict=False)[0]
        out.float().pow(2).mean().backward()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    finally:
        for p in unet.parameters():
            p.grad = None


def needs_checkpointing(unet, device, autocast, rows: int, latent_size: tuple[int, ...], text_shape: tuple[int, int],
                        text_dtype: torch.dtype, state_bytes: int) -> dict:
    """train.gradient_checkpointing=null: whether a step of `rows` rows needs gradient checkpointing to fit in
    the free memory of a CUDA `device` (probe steps on 1 and 2 rows, `step_memory_need`); never elsewhere.
    Returns {"gradient_checkpointing": bool, and on CUDA "need_gb", "free_gb"}."""
    from mvc.core.perf import free_memory_bytes, is_cuda

    if not is_cuda(device):
        return {"gradient_checkpointing": False}
    try:
        peaks = [probe_step_peak(unet, r, latent_size, text_shape, text_dtype, autocast) for r in (1, 2)]
    except Exception as e:  # out of memory already (or a probe that cannot run): the safe choice
        torch.cuda.empty_cache()
        log.warning("the memory probe of the training step failed (%s: %s); gradient checkpointing on",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return {"gradient_checkpointing": True, "need_gb": None, "free_gb": None}
    need, free = step_memory_need(*peaks, rows, state_bytes), free_memory_bytes(device)
    return {"gradient_checkpointing": need > MEMORY_MARGIN * free, "need_gb": round(need / 1e9, 2),
            "free_gb": round(free / 1e9, 2)}


def optimizer_state_bytes(params: list[torch.nn.Parameter], train_cfg, world: int) -> int:
    """Bytes the optimizer (Adam: two fp32 moments; 8-bit Adam: two bytes), the EMA (one copy, one more
    transient with foreach) and DDP's gradient buckets (several processes) will add to the weights."""
    n = sum(p.numel() for p in params)
    per = 2 if train_cfg.use_8bit_adam else 8
    if train_cfg.use_ema:
        per += 8 if train_cfg.ema_foreach else 4
    if world > 1:
        per += 4
    return n * per
