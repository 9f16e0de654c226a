"""Self-describing, atomic, rotated checkpoints shared by fine-tuning and classifier training.

A checkpoint is one file `<dir>/checkpoint-<step:08d>.pt` holding a dict:
`{"format_version", "kind", "trained_on", "step", "config", ...caller's state...}`. `kind` says which
stage wrote it (`finetune`, `classifier`, `reference`); `trained_on` is a flat dict of what the result
depends on (config keys that matter, fingerprints of the data subset, the pairs, the prompts...), so a
resume with anything else is refused in one line naming what differs. It is written to a temporary
file and renamed, so a crash never leaves a half-written checkpoint (the temporary files of a killed
writer are removed at the next start); it is loaded with `torch.load(weights_only=True)`, so it may
only hold tensors, numbers, strings and containers of them (state dicts of models and optimizers
qualify), and a file that holds anything else is refused, never unpickled.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mvc.core.utils import MVCError, atomic_path, clean_stale_temps, flatten, short_repr

FORMAT_VERSION = 1
_NAME = re.compile(r"^checkpoint-(\d{8})\.pt$")
log = logging.getLogger(__name__)


def checkpoint_path(ckpt_dir: str | os.PathLike, step: int) -> Path:
    """The file name of the checkpoint for `step`."""
    return Path(ckpt_dir) / f"checkpoint-{int(step):08d}.pt"


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints in `ckpt_dir`, oldest first (plain files only: a link or a FIFO is not one of ours)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if _NAME.match(p.name) and p.is_file() and not p.is_symlink())


def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, state: dict[str, Any], config: dict, keep: int = 3,
                    kind: str | None = None, trained_on: dict[str, Any] | None = None) -> Path:
    """Write `state` (+ kind, trained_on, step, config, format version) atomically and keep only the
    newest `keep` files."""
    path = checkpoint_path(ckpt_dir, step)
    clean_stale_temps(ckpt_dir)  # what a writer killed mid-save left
    payload = {"format_version": FORMAT_VERSION, "kind": kind, "trained_on": trained_on, "step": int(step),
               "config": config, **state}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    if keep > 0:
        for old in list_checkpoints(ckpt_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def checkpoint_kind(ckpt: dict[str, Any]) -> str:
    """The stage that wrote a checkpoint (read from older checkpoints' contents, which do not say it)."""
    if ckpt.get("kind"):
        return str(ckpt["kind"])
    if "unet" in ckpt:
        return "finetune"
    return "classifier" if "model_meta" in ckpt else "unknown"


def load_checkpoint(path: str | os.PathLike, kind: str | tuple[str, ...] | None = None) -> dict[str, Any]:
    """Load one checkpoint safely (weights_only), check its format version and (when given) its kind."""
    path = Path(path)
    if not path.is_file():  # a FIFO or a device would block torch.load
        raise MVCError(f"no checkpoint file at {str(path)!r}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only met something other than tensors and plain containers
        raise MVCError(f"{path} is not a file torch can load safely (it holds Python objects besides tensors and "
                       "plain data, or is a pickle of another kind); it is not unpickled, since that could run any "
                       "code: use a checkpoint written by this project") from None
    except Exception as e:  # truncated / corrupt / not a checkpoint
        first = (str(e).strip().splitlines() or [""])[0]
        raise MVCError(f"cannot read checkpoint {path} ({type(e).__name__}: {first[:150]}); it is "
                       "truncated or not a checkpoint") from None
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != FORMAT_VERSION:
        raise MVCError(f"{path} is not an MVC checkpoint of format {FORMAT_VERSION}")
    wanted = (kind,) if isinstance(kind, str) else kind
    if wanted and checkpoint_kind(ckpt) not in wanted:
        raise MVCError(f"{path} is a {checkpoint_kind(ckpt)} checkpoint, not a {' or '.join(wanted)} one; "
                       "give a checkpoint of this stage")
    return ckpt


def trained_on_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between two `trained_on` records, for an error line ("" when nothing does):
    the first three keys, then each with its old and new value."""
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if not diff:
        return ""
    shown = "; ".join(f"{k}: {short_repr(old.get(k), 30)} -> {short_repr(new.get(k), 30)}" for k in diff[:3])
    more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
    return f"{', '.join(diff[:3])}{more} ({shown})"


RESUME_FIX = "restore those settings and data, or start fresh without --resume"


def check_trained_on(ckpt: dict[str, Any], trained_on: dict[str, Any], path: str | os.PathLike,
                     fix: str = RESUME_FIX) -> None:
    """Refuse (one line, naming what differs, then `fix`: what to do) to resume a checkpoint trained on anything else.

    A checkpoint older than `trained_on` records is compared on the config keys its saved config has."""
    old = ckpt.get("trained_on")
    if old is None:
        saved = flatten(ckpt.get("config") or {})
        old = {k: saved[k] for k in trained_on if k in saved}
        trained_on = {k: trained_on[k] for k in old}
    diff = trained_on_diff(old, trained_on)
    if diff:
        raise MVCError(f"cannot resume from {Path(path).name}: it was trained on other {diff}; {fix}")


def check_resume(resume: str | None, ckpt_dir: str | os.PathLike, fresh_ok: bool = True) -> None:
    """Fail early (before any data or model loading) when `resume` names nothing to resume from, or (when not
    `fresh_ok`) when a fresh run would write its checkpoints among an earlier run's: rotation and a later
    `--resume latest` would then mix the two runs."""
    if resume in (None, "", "none"):
        old = list_checkpoints(ckpt_dir)
        if old and not fresh_ok:
            raise MVCError(f"{ckpt_dir} holds the checkpoints of an earlier run (the newest: {old[-1].name}); add "
                           "--resume latest to continue it, or delete that folder to start over")
        return
    if resume == "latest":
        if not list_checkpoints(ckpt_dir):
            raise MVCError(f"--resume latest: no checkpoint in {ckpt_dir}; run without --resume to start fresh")
    elif not Path(resume).is_file():
        raise MVCError(f"--resume: no checkpoint file at {resume}")


def resolve_resume(resume: str | None, ckpt_dir: str | os.PathLike, kind: str | None = None,
                   trained_on: dict[str, Any] | None = None, fresh_ok: bool = True,
                   fix: str = RESUME_FIX) -> dict[str, Any] | None:
    """Load the checkpoint named by `resume`: None (start fresh), 'latest', or a path; check its kind and
    what it was trained on (`fix`: what a refusal tells the user to do). Temporary files a killed writer left
    in `ckpt_dir` are removed first.

    With 'latest', a corrupt newest checkpoint is skipped with a warning and the previous one is
    used; 'latest' with no checkpoint at all is an error (the user asked to resume).
    """
    clean_stale_temps(ckpt_dir)
    check_resume(resume, ckpt_dir, fresh_ok)
    if resume in (None, "", "none"):
        return None
    if resume == "latest":
        for p in reversed(list_checkpoints(ckpt_dir)):
            try:
                ckpt = load_checkpoint(p)
            except MVCError as e:
                log.warning("skipping unreadable checkpoint %s (%s); trying the previous one", p.name, e)
                continue
            return _checked(ckpt, p, kind, trained_on, fix)
        raise MVCError(f"--resume latest: every checkpoint in {ckpt_dir} is unreadable")
    return _checked(load_checkpoint(resume), resume, kind, trained_on, fix)


def _checked(ckpt: dict[str, Any], path: str | os.PathLike, kind: str | None,
             trained_on: dict[str, Any] | None, fix: str = RESUME_FIX) -> dict[str, Any]:
    """`ckpt` after checking its kind and what it was trained on."""
    if kind is not None and checkpoint_kind(ckpt) != kind:
        raise MVCError(f"cannot resume from {path}: it is a {checkpoint_kind(ckpt)} checkpoint, not a {kind} one")
    if trained_on is not None:
        check_trained_on(ckpt, trained_on, path, fix)
    return ckpt


def rng_state() -> dict[str, Any]:
    """Capture python, numpy and torch CPU RNG states, and every CUDA device's once CUDA is in use (left out
    before, so that saving never starts CUDA), in a weights_only-loadable form."""
    np_state = np.random.get_state()
    state = {
        "python": [int(x) for x in random.getstate()[1]],
        "python_pos": random.getstate()[2] if random.getstate()[2] is not None else -1,
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()  # one (uint8) state per device
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states captured by `rng_state`; a CUDA state (absent from CPU runs and from checkpoints
    written before it was recorded) is restored when this process sees as many CUDA devices, else skipped with a
    warning (the resumed run then draws other CUDA numbers than the uninterrupted one)."""
    pos = state["python_pos"]
    random.setstate((3, tuple(state["python"]), None if pos == -1 else pos))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None:
        return
    here = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if here == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
    else:
        log.warning("the checkpoint's CUDA RNG state is of %d device(s), this process sees %d: not restored, so "
                    "CUDA draws differ from the uninterrupted run's", len(cuda), here)
