"""Speed and memory levers on an accelerator, and the measures that judge them.

Stages call these unconditionally: off CUDA each CUDA-only lever is a no-op and each memory query returns
None, so CPU runs (and tests) take the same code paths as a GPU run.
- levers: TF32 (`set_tf32`), channels-last memory format (`channels_last`), `torch.compile` (`compiled`);
- memory: the peak allocated since a reset (`reset_peak_memory`, `peak_memory_gb`), and what a new allocation
  can still get (`free_memory_bytes`: the driver's free memory plus what torch's caching allocator holds);
- FLOPs: torch's counter on the meta device, so counting SD-1.5's U-Net costs no memory (`unet_flops`,
  `count_flops`); the bf16 matmul peak a GPU reaches (`matmul_tflops`), the yardstick of "share of the GPU".
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

DEFAULT_BATCH = 16  # images per pipeline call when generate.batch_size is null, off CUDA (no memory to size it from)


def is_cuda(device: Any) -> bool:
    """Whether `device` (a torch.device, a string, or None) is a CUDA device."""
    return device is not None and torch.device(device).type == "cuda"


#################################################################################
#                                    Levers                                     #
#################################################################################

def set_tf32(enabled: bool, device: Any) -> None:
    """TF32 tensor cores for fp32 matmuls and cuDNN convolutions on CUDA (10-bit mantissa); nothing elsewhere."""
    if is_cuda(device):
        torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
        torch.backends.cudnn.allow_tf32 = bool(enabled)


def channels_last(module: torch.nn.Module, enabled: bool = True) -> torch.nn.Module:
    """`module` with its 4-D weights in channels-last (NHWC) layout when `enabled` (contiguous NCHW otherwise);
    convolutions then hand channels-last activations on. The same module, changed in place."""
    return module.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)


def compiled(module: torch.nn.Module, enabled: bool) -> Any:
    """`torch.compile(module)` when `enabled`, else `module`: a wrapper that shares the module's weights, so the
    plain module can still be used (validation, export) without compiling again."""
    return torch.compile(module) if enabled else module


#################################################################################
#                                    Memory                                     #
#################################################################################

def reset_peak_memory(device: Any) -> None:
    """Start a new peak of allocated memory on a CUDA `device` (nothing elsewhere)."""
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: Any) -> float | None:
    """The most memory torch allocated on a CUDA `device` since the last reset, in GB (None elsewhere)."""
    if not is_cuda(device):
        return None
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 3)


def free_memory_bytes(device: Any) -> int | None:
    """Bytes a new allocation can get on a CUDA `device`: the driver's free memory plus what torch's caching
    allocator reserved but does not use (None elsewhere)."""
    if not is_cuda(device):
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


#################################################################################
#                                    FLOPs                                      #
#################################################################################

def count_flops(fn: Callable[[], Any], by_op: bool = False) -> Any:
    """FLOPs of what `fn()` runs, by torch's flop counter (matmuls, convolutions, attention); `by_op`: a dict of
    them by operator name instead ("aten.convolution_backward": ..., "aten.mm": ...)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    if by_op:
        return {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops())


def unet_flops(config: dict, batch: int, latent_size: int, text_len: int = 77, train: bool = False,
               checkpointing: bool = False, by_op: bool = False) -> Any:
    """FLOPs of one call of a diffusers UNet2DConditionModel of `config` on `batch` rows of latent_size^2
    latents: the forward, or forward + backward (+ the recomputed forward under `checkpointing`) when `train`
    (`by_op`: by operator, as `count_flops`). Counted on the meta device (no weights are made)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(config))
        x = torch.zeros(batch, unet.config.in_channels, latent_size, latent_size)
        emb = torch.zeros(batch, text_len, unet.config.cross_attention_dim)
        t = torch.zeros(batch, dtype=torch.long)
    if train and checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train(train)

    def call():
        with torch.set_grad_enabled(train):
            out = unet(x, t, encoder_hidden_states=emb, return_dict=False)[0]
            if train:
                out.float().mean().backward()

    return count_flops(call, by_op)


#################################################################################
#                                  Matmul peak                                  #
#################################################################################

def timed(fn: Callable[[], Any], device: Any, repeats: int, warmup: int = 2) -> list[float]:
    """Seconds of each of `repeats` calls of `fn` after `warmup` untimed ones (CUDA events on CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if is_cuda(device):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return times


def matmul_tflops(device: Any, n: int = 8192, dtype: torch.dtype = torch.bfloat16, repeats: int = 20) -> float:
    """Achieved TFLOP/s of an n x n x n matmul in `dtype` on `device` (median of `repeats` timed products):
    the yardstick of how much of the accelerator a stage uses."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    med = statistics.median(timed(lambda: torch.matmul(a, b, out=out), device, repeats))
    return 2 * n ** 3 / med / 1e12
