"""The diffusion-training engine: one loop for MVC fine-tuning, DreamBooth and textual inversion.

A trainer describes its run as a `Task` (its weights, optimizer and data, the loss of one micro-step, the state
its checkpoints hold, its export); `train` runs the rest the same way for all three: resume and RNG state,
accelerate's prepare, the seeded draws of each micro-step, backward / clipping / optimizer / schedule / EMA,
losses read at sync points only (no host sync per step) with a stop at the first non-finite one, TensorBoard and
JSON-lines logs, the progress bar, checkpoint cadence and retention, and the export.
docs/training_engine.md describes the contract and the order of every draw.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from mvc.core import seeds
from mvc.core.checkpoint import RESUME_FIX, resolve_resume, rng_state, save_checkpoint, set_rng_state
from mvc.core.perf import peak_memory_gb, reset_peak_memory
from mvc.core.utils import MVCError, RunLogger

#################################################################################
#                        The draws of a step and its cadence                    #
#################################################################################

def draw_noise(n: int, latent_shape: tuple[int, ...], num_train_timesteps: int,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The diffusion draws of n rows, in this order: timesteps (n,) long, diffusion noise and posterior-sample
    noise (n, C, h, w). Every trainer draws these from its step's generator (after its own draws, if any)."""
    t = torch.randint(0, num_train_timesteps, (n,), generator=generator)
    noise = torch.randn((n, *latent_shape), generator=generator)
    eps = torch.randn((n, *latent_shape), generator=generator)
    return t, noise, eps


@dataclass(frozen=True)
class Cadence:
    """How long a run trains and how often it logs, validates and saves (a step: one optimizer update)."""
    max_steps: int
    log_every: int
    checkpoint_every: int
    checkpoints_keep: int
    validate_every: int | None = None  # None: the task never validates
    log_at_checkpoints: bool = False   # also log at every checkpoint step (DreamBooth, textual inversion)

    def points(self, step: int) -> tuple[bool, bool, bool]:
        """(logs, validates, saves) after optimizer step `step`; the last step does all three."""
        last = step == self.max_steps
        saves = step % self.checkpoint_every == 0 or last
        logs = step % self.log_every == 0 or step == 1 or last or (saves and self.log_at_checkpoints)
        validates = self.validate_every is not None and (step % self.validate_every == 0 or last)
        return logs, validates, saves


#################################################################################
#                                   The task                                    #
#################################################################################

class Task:
    """What a trainer supplies; `train` runs the loop around it. A subclass builds its weights, caches and
    optimizer in `__init__` and sets the attributes below; the methods have defaults where most trainers agree."""
    kind: str = ""            # the checkpoints' kind (mvc.core.checkpoint)
    label: str = ""           # the progress bar's text
    prefix: str = ""          # the logged scalars' prefix, e.g. "train/"
    step_role: str = ""       # the seeds role (mvc.core.seeds.ROLES) of a step's draws
    error_prefix: str = ""    # put before the non-finite error
    nonfinite_fix: str = ""   # what the non-finite error tells the user to do
    accumulates: bool = False  # a step is accelerate's gradient-accumulation count of micro-steps (accumulate())
    images_per_step: int = 0  # global images of one micro-step (for images/s)
    seed: int = 0             # the base seed of the step draws (may be set by `restore`)
    params: Sequence = ()     # the trainable parameters (clipping, EMA)
    optimizer: Any = None
    lr_scheduler: Any = None  # None: a constant rate
    ema: Any = None           # diffusers' EMAModel, stepped after each optimizer step
    max_grad_norm: float | None = None  # None: no clipping (and no gradient norm logged)

    def models(self) -> list:
        """The modules that go through accelerate's prepare (DDP, autocast) with the optimizer."""
        return []

    def set_prepared(self, models: list) -> None:
        """Take the prepared modules (same order as `models`)."""

    def draw_index(self, step: int, micro: int) -> tuple[int, ...]:
        """The indices of a micro-step's generator under `step_role`."""
        return (step,)

    def restore(self, ckpt: dict | None) -> None:
        """Load the task's state from a checkpoint before prepare (None: a fresh start)."""

    def state(self) -> dict:
        """The task's part of a checkpoint: its trainable weights, data orders, ..."""
        return {}

    def loss(self, step: int, micro: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(this process's loss to backward, the global loss record (detached; 0-d or (k,)) of the micro-step)."""
        raise NotImplementedError

    def after_backward(self) -> None:
        """Anything between backward and the optimizer step (e.g. an all-reduce of a plain tensor's gradient)."""

    def loss_value(self, record: Any) -> float:
        """The loss of one step's record, read on the host."""
        return float(record)

    def scalars(self, record: Any) -> dict:
        """What is logged of the last step's record, "loss" first."""
        return {"loss": self.loss_value(record)}

    def setup_scalars(self) -> dict:
        """Scalars logged once at the start under "setup/"."""
        return {}

    def validate(self, step: int, logger: RunLogger) -> None:
        """Log a validation of the current weights (main process, at the validation cadence)."""

    def export(self, step: int, result: dict) -> None:
        """Write the finished result (main process, after the last step)."""


#################################################################################
#                        Per-step values, read at sync points                   #
#################################################################################

class PendingSteps:
    """Loss records and gradient norms of the steps since the last sync point, kept as device tensors (reading a
    value waits for the accelerator, which then idles while the host prepares the next step)."""

    def __init__(self, task: Task, step: int):
        self.task, self.step, self.records, self.norm = task, step, [], None
        self.images, self.t0 = 0, time.perf_counter()

    def add(self, record: torch.Tensor, grad_norm: torch.Tensor | None, images: int) -> None:
        """One optimizer step: its global loss record, its gradient norm (None: not computed)."""
        self.records.append(record.detach())
        self.norm = grad_norm.detach() if grad_norm is not None else self.norm
        self.images += images

    def flush(self) -> tuple[list, float, float]:
        """(records, last gradient norm, images/s since the last flush), read in one sync; MVCError at the first
        non-finite loss, before anything is written from the weights it produced."""
        rows = torch.stack(self.records).float().cpu().tolist()  # the one host sync of the interval
        norm = float(self.norm) if self.norm is not None else float("nan")
        elapsed = time.perf_counter() - self.t0
        for i, row in enumerate(rows):
            if not all(math.isfinite(v) for v in (row if isinstance(row, list) else [row])):
                raise MVCError(f"{self.task.error_prefix}non-finite loss ({self.task.loss_value(row)}) at step "
                               f"{self.step + i + 1}; {self.task.nonfinite_fix}")
        ips = self.images / elapsed if elapsed > 0 else float("nan")
        self.step += len(rows)
        self.records, self.images, self.t0 = [], 0, time.perf_counter()
        return rows, norm, ips


#################################################################################
#                                   The loop                                    #
#################################################################################

def resume_into(task: Task, acc: Any, ckpt_dir: Path, resume: str | None, trained_on: dict, fresh_ok: bool,
                fix: str) -> tuple[int, dict | None, list]:
    """Resolve `resume` (None, 'latest' or a path; refused in one line when trained on anything else), restore the
    task, the schedule and (one process, written by one) the global RNGs; prepare the models and the optimizer,
    then load the optimizer's state. Returns (the step to continue from, the checkpoint or None, the prepared
    models)."""
    ckpt = resolve_resume(resume, ckpt_dir, kind=task.kind, trained_on=trained_on, fresh_ok=fresh_ok, fix=fix)
    task.restore(ckpt)
    if ckpt is not None:
        if task.lr_scheduler is not None:
            task.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
        if acc.num_processes == 1 and int(ckpt.get("world_size", 1)) == 1:  # the global RNGs are per process
            set_rng_state(ckpt["rng"])
    models = task.models()
    prepared = acc.prepare(*models, task.optimizer)
    prepared = list(prepared) if isinstance(prepared, (list, tuple)) else [prepared]
    task.optimizer = prepared[-1]
    task.set_prepared(prepared[:-1])
    if ckpt is not None:
        task.optimizer.load_state_dict(ckpt["optimizer"])
    return (int(ckpt["step"]) if ckpt is not None else 0), ckpt, prepared[:-1]


def optimizer_step(task: Task, acc: Any, models: list, step: int,
                   micro_steps: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step of `micro_steps` micro-steps, each with its own generator (`task.step_role`, its
    `draw_index`), under accelerate's `accumulate` of the prepared `models` when the task accumulates: backward,
    clipping at the sync, optimizer, then the schedule and the EMA. Returns (the step's
    global loss record, the gradient norm or None), both left on the device."""
    record, grad_norm = None, None
    for micro in range(micro_steps):
        generator = seeds.generator(task.seed, task.step_role, *task.draw_index(step, micro))
        with acc.accumulate(*models) if task.accumulates else contextlib.nullcontext():
            loss, part = task.loss(step, micro, generator)
            acc.backward(loss)
            task.after_backward()
            if task.max_grad_norm is not None and acc.sync_gradients:
                grad_norm = acc.clip_grad_norm_(task.params, task.max_grad_norm)
            task.optimizer.step()
            task.optimizer.zero_grad(set_to_none=True)
        record = part if record is None else record + part
    if task.lr_scheduler is not None and not task.optimizer.step_was_skipped:
        task.lr_scheduler.step()
    if task.ema is not None:
        task.ema.step(task.params)
    return record, grad_norm


def train(task: Task, acc: Any, out_dir: Path, cadence: Cadence, config: dict, trained_on: dict,
          resume: str | None = None, fresh_ok: bool = True, fix: str = RESUME_FIX, progress: bool = True) -> dict:
    """Train `task` with `acc` up to `cadence.max_steps`: checkpoints (`trained_on` recorded) in
    `out_dir/checkpoints`, logs in `out_dir`, the export by the main process. Returns {"losses": per-step global
    losses of this run, "step", "images_per_s", "grad_accum", "train_seconds"}."""
    main, ckpt_dir = acc.is_main_process, Path(out_dir) / "checkpoints"
    step, ckpt, models = resume_into(task, acc, ckpt_dir, resume, trained_on, fresh_ok, fix)
    accum = int(acc.gradient_accumulation_steps) if task.accumulates else 1
    logger = RunLogger(out_dir, enabled=main, truncate_to=step if ckpt is not None else -1)  # no replayed records
    logger.config(config, metrics=[f"{task.prefix}loss"])
    setup = task.setup_scalars()
    if setup:
        logger.scalars(step, setup, prefix="setup/")
    losses: list[float] = []
    ips, t_train = float("nan"), time.perf_counter()
    pending = PendingSteps(task, step)
    reset_peak_memory(acc.device)
    bar = tqdm(total=cadence.max_steps, initial=step, desc=task.label, disable=not (progress and main))
    while step < cadence.max_steps:
        record, grad_norm = optimizer_step(task, acc, models, step, accum)
        step += 1
        pending.add(record, grad_norm, task.images_per_step * accum)
        bar.update(1)
        logs, validates, saves = cadence.points(step)
        if not (logs or validates or saves):
            continue
        # a sync point, on every process alike: read (and check) the steps since the last one
        rows, norm, ips = pending.flush()
        losses += [task.loss_value(r) for r in rows]
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if main and logs:
            logger.scalars(step, step_scalars(task, rows[-1], norm, ips, acc.device), prefix=task.prefix)
        if main and validates:
            task.validate(step, logger)
            pending.t0 = time.perf_counter()  # the next interval times training only
        if saves:
            if main:
                state = {**task.state(), "optimizer": task.optimizer.state_dict(),
                         **({"lr_scheduler": task.lr_scheduler.state_dict()} if task.lr_scheduler else {}),
                         "rng": rng_state(), "world_size": acc.num_processes}
                save_checkpoint(ckpt_dir, step, state, config, keep=cadence.checkpoints_keep, kind=task.kind,
                                trained_on=trained_on)
            acc.wait_for_everyone()
            pending.t0 = time.perf_counter()
    bar.close()
    logger.close()
    result = {"losses": losses, "step": step, "images_per_s": ips, "grad_accum": accum,
              "train_seconds": time.perf_counter() - t_train}
    if main:
        task.export(step, result)
    acc.wait_for_everyone()
    return result


def step_scalars(task: Task, record: Any, grad_norm: float, ips: float, device: Any) -> dict:
    """The logged values of a sync point: the task's, the learning rate, the gradient norm, images/s, peak memory."""
    lr = task.lr_scheduler.get_last_lr()[0] if task.lr_scheduler is not None else task.optimizer.param_groups[0]["lr"]
    peak = peak_memory_gb(device)
    return {**task.scalars(record), "lr": lr, **({"grad_norm": grad_norm} if task.max_grad_norm is not None else {}),
            "images_per_s": ips, **({"peak_memory_gb": peak} if peak is not None else {})}
