"""accelerate at the edge: the one place that builds an `Accelerator` and shares values between processes.

`mvc/` never names a device: stages take an accelerator (or build one here) and ask it for the device,
the rank and the world size. A run launched with `accelerate launch` or `torchrun` gets one process per
device; on a machine without an accelerator, several processes run on the CPU (gloo).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from mvc.core.registry import publish_choices
from mvc.core.seeds import resolve_seed
from mvc.core.utils import MVCError

PRECISIONS = ("no", "fp16", "bf16")  # accelerate's mixed-precision modes
DTYPES = ("fp16", "bf16", "fp32")     # weight dtypes of inference models (captioner, generation pipeline)
publish_choices("precision", PRECISIONS)
publish_choices("dtype", DTYPES)
_TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def make_accelerator(mixed_precision: str | None = None, grad_accum: int | None = None,
                     key: str = "mixed_precision"):
    """An `Accelerator`; `None` leaves a setting to accelerate (`accelerate config` / `accelerate launch` flags).

    A mixed precision its device cannot compute in is refused in one line naming `key` (`check_precision`).

    Runs are data-parallel (DDP, or one process): checkpoints and the exported pipeline read full
    state dicts on the main process, so a sharded backend (FSDP, DeepSpeed, Megatron-LM) is refused.
    """
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, is_xpu_available

    # accelerate only picks multi-process CPU (gloo) when told `cpu=True`: do so for a torchrun /
    # accelerate-launch run on a machine without an accelerator
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    kw: dict[str, Any] = {"cpu": multi and not torch.cuda.is_available() and not is_xpu_available()}
    if mixed_precision is not None:
        kw["mixed_precision"] = mixed_precision
    if grad_accum is not None:  # a plugin, because accelerate lets its environment variable win over the argument
        kw["gradient_accumulation_plugin"] = GradientAccumulationPlugin(num_steps=int(grad_accum))
    try:
        acc = Accelerator(**kw)
    except (ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MVCError(f"cannot set up accelerate (mixed_precision={mixed_precision}): {first}") from None
    check_precision(str(acc.mixed_precision), acc.device,
                    key if mixed_precision is not None else "accelerate's mixed precision (accelerate config / launch)")
    kind = str(getattr(acc.distributed_type, "value", acc.distributed_type))
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise MVCError(f"accelerate is configured for {kind}; MVC runs data-parallel only (DDP, or one process): "
                       "choose multi-GPU without FSDP/DeepSpeed in `accelerate config`")
    return acc


#################################################################################
#                        Precisions a device can compute in                     #
#################################################################################

def precision_problem(precision: str | None, device_type: str, bf16_supported: bool = True) -> str | None:
    """Why a `device_type` device ('cpu', 'cuda', 'mps') cannot compute in `precision` (a mixed precision: no,
    fp16, bf16; or a weight dtype: fp32, fp16, bf16); None when it can. The one table every stage consults.

    fp16 needs a GPU: on the CPU accelerate does not autocast to it, so an fp16 cache meets fp32 weights. bf16
    needs an Ampere or newer CUDA GPU, or an MPS device (macOS 14) that has it; the CPU autocasts to it."""
    if precision in (None, "no", "fp32"):
        return None
    if precision not in ("fp16", "bf16"):
        return f"unknown precision {precision!r}; use one of no, fp32, fp16, bf16"
    if precision == "fp16" and device_type == "cpu":
        return "fp16 needs a GPU (CUDA or MPS); on the CPU use bf16, or no / fp32"
    if precision == "bf16" and not bf16_supported:
        return f"this {device_type} device has no bf16; use fp16, or no / fp32"
    return None


def bf16_supported(device: Any) -> bool:
    """Whether `device` computes in bf16 (asked of the device itself, not assumed)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if kind == "mps":
        try:
            torch.ones(1, dtype=torch.bfloat16, device="mps")
        except (RuntimeError, TypeError):
            return False
    return True


def check_precision(precision: str | None, device: Any, key: str) -> None:
    """Refuse, in one line naming the setting `key`, a precision that `device` cannot compute in."""
    kind = torch.device(device).type
    problem = precision_problem(precision, kind, bf16_supported(device) if precision == "bf16" else True)
    if problem is not None:
        raise MVCError(f"{key} {precision!r} cannot run on {kind}: {problem}")


def stage_precision() -> str:
    """The mixed precision of the running stage's accelerator (accelerate's process-wide state), 'no' before any
    is built; read without building one (a second `Accelerator` resets the first one's gradient accumulation)."""
    from accelerate.state import AcceleratorState, is_initialized

    return str(AcceleratorState().mixed_precision) if is_initialized() else "no"


def accelerator_settings(acc: Any) -> dict:
    """What an accelerator runs with: its mixed precision, gradient accumulation, processes and device."""
    return {"mixed_precision": str(acc.mixed_precision), "grad_accum": int(acc.gradient_accumulation_steps),
            "processes": int(acc.num_processes), "device": str(acc.device)}


def resolve_dtype(name: str | None, device: Any, key: str = "dtype") -> torch.dtype:
    """The torch dtype of an inference model: `name` (fp16, bf16, fp32), else fp16 on CUDA and fp32 elsewhere; a
    dtype `device` cannot compute in is refused in one line naming the setting `key`."""
    if name is None:
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if name not in _TORCH_DTYPES:
        raise MVCError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    check_precision(name, device, key)
    return _TORCH_DTYPES[name]


def shard_rows(batch_size: int, world: int, rank: int, what: str = "the batch size") -> slice:
    """The contiguous rows of a global batch of `batch_size` that process `rank` of `world` keeps (as
    `torch.tensor_split`: the first `batch_size % world` processes take one row more)."""
    if batch_size < world:
        raise MVCError(f"{what} ({batch_size}) is smaller than the {world} processes; raise it or use fewer processes")
    q, r = divmod(batch_size, world)
    start = rank * q + min(rank, r)
    return slice(start, start + q + (rank < r))


def broadcast_object(acc: Any, obj: Any) -> Any:
    """The main process's `obj` on every process."""
    if acc.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj if acc.is_main_process else None]
    broadcast_object_list(box)
    return box[0]


def broadcast_seed(acc: Any, seed: int | None) -> int:
    """Resolve a None seed once (on the main process) and share it, so every process uses the same base seed."""
    return int(broadcast_object(acc, resolve_seed(seed) if acc.is_main_process else None))
