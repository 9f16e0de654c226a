"""Self-describing, atomic, rotated checkpoints shared by fine-tuning and classifier training.

A checkpoint is one file `<dir>/checkpoint-<step:08d>.pt` holding a dict:
`{"format_version", "step", "config", ...caller's state...}`. It is written to a temporary
file and renamed, so a crash never leaves a half-written checkpoint; it is loaded with
`torch.load(weights_only=True)`, so it may only hold tensors, numbers, strings and
containers of them (state dicts of models and optimizers qualify).
"""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mvc.utils import MVCError, atomic_path

FORMAT_VERSION = 1
_NAME = re.compile(r"^checkpoint-(\d{8})\.pt$")
log = logging.getLogger(__name__)


def checkpoint_path(ckpt_dir: str | os.PathLike, step: int) -> Path:
    """The file name of the checkpoint for `step`."""
    return Path(ckpt_dir) / f"checkpoint-{int(step):08d}.pt"


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints in `ckpt_dir`, oldest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if _NAME.match(p.name))


def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, state: dict[str, Any], config: dict, keep: int = 3) -> Path:
    """Write `state` (+ step, config, format version) atomically and keep only the newest `keep` files."""
    path = checkpoint_path(ckpt_dir, step)
    payload = {"format_version": FORMAT_VERSION, "step": int(step), "config": config, **state}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    if keep > 0:
        for old in list_checkpoints(ckpt_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load one checkpoint safely (weights_only) and check its format version."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated / corrupt / not a checkpoint
        raise MVCError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != FORMAT_VERSION:
        raise MVCError(f"{path} is not an MVC checkpoint of format {FORMAT_VERSION}")
    return ckpt


def check_resume(resume: str | None, ckpt_dir: str | os.PathLike) -> None:
    """Fail early (before any data or model loading) when `resume` names nothing to resume from."""
    if resume in (None, "", "none"):
        return
    if resume == "latest":
        if not list_checkpoints(ckpt_dir):
            raise MVCError(f"--resume latest: no checkpoint in {ckpt_dir}; run without --resume to start fresh")
    elif not Path(resume).is_file():
        raise MVCError(f"--resume: no checkpoint file at {resume}")


def resolve_resume(resume: str | None, ckpt_dir: str | os.PathLike) -> dict[str, Any] | None:
    """Load the checkpoint named by `resume`: None (start fresh), 'latest', or a path.

    With 'latest', a corrupt newest checkpoint is skipped with a warning and the previous one is
    used; 'latest' with no checkpoint at all is an error (the user asked to resume).
    """
    check_resume(resume, ckpt_dir)
    if resume in (None, "", "none"):
        return None
    if resume == "latest":
        for p in reversed(list_checkpoints(ckpt_dir)):
            try:
                return load_checkpoint(p)
            except MVCError as e:
                log.warning("skipping unreadable checkpoint %s (%s); trying the previous one", p.name, e)
        raise MVCError(f"--resume latest: every checkpoint in {ckpt_dir} is unreadable")
    return load_checkpoint(resume)


def rng_state() -> dict[str, Any]:
    """Capture python, numpy and torch CPU RNG states in a weights_only-loadable form."""
    np_state = np.random.get_state()
    return {
        "python": [int(x) for x in random.getstate()[1]],
        "python_pos": random.getstate()[2] if random.getstate()[2] is not None else -1,
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states captured by `rng_state`."""
    pos = state["python_pos"]
    random.setstate((3, tuple(state["python"]), None if pos == -1 else pos))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
