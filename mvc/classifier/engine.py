"""One training epoch, evaluation, the optimizer and the LR schedule (no device strings: accelerate)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from mvc.core.registry import Registry, publish_choices
from mvc.core.schedules import lr_multiplier
from mvc.core.utils import MVCError

OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry("optimizer")
publish_choices("optimizer", OPTIMIZERS)
OPTIMIZERS.register("adam")(lambda params, cfg, fused: torch.optim.Adam(
    params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused))
OPTIMIZERS.register("adamw")(lambda params, cfg, fused: torch.optim.AdamW(
    params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused))
OPTIMIZERS.register("sgd")(lambda params, cfg, fused: torch.optim.SGD(
    params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused))


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    """The optimizer `cfg.optimizer` names (`OPTIMIZERS`: adam, adamw, sgd with momentum), with torch's fused
    kernel (one pass over all weights: about 4x faster steps on a CPU) when every weight allows it."""
    params = list(params)
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params) or None
    return OPTIMIZERS.get(cfg.optimizer)(params, cfg, fused)


def plan_lr(cfg, plan, step: int) -> float:
    """LR of optimizer step `step` (0-based) of an epoch under its plan: the schedule spans the epoch's phase."""
    progress = (plan.phase_step + step) / max(plan.phase_steps, 1)
    return float(cfg.lr) * plan.lr_scale * lr_multiplier(cfg.scheduler, progress, 1.0, milestones=cfg.milestones,
                                                         gamma=cfg.gamma)


def train_one_epoch(model: nn.Module, loader, optimizer, accelerator, loss_fn, lr_at, epoch: int,
                    show_progress: bool = True) -> dict:
    """Train one epoch; `lr_at(step)` sets the LR of each step. Returns mean loss, accuracy, the share
    of synthetic images seen, the last LR and the step count (this process's view)."""
    model.train()
    tot_loss, correct, seen, n_syn, steps, lr = 0.0, 0, 0, 0, len(loader), 0.0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=not show_progress)
    for step, (x, y, is_syn) in enumerate(bar):
        lr = lr_at(step)
        for g in optimizer.param_groups:
            g["lr"] = lr
        x, y = x.to(accelerator.device), y.to(accelerator.device)
        with accelerator.autocast():
            logits = model(x)  # (B, C)
            loss = loss_fn(logits, y)
        if not torch.isfinite(loss):
            raise MVCError(f"non-finite loss at epoch {epoch + 1} step {step}; lower classifier.lr")
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        tot_loss += float(loss.detach()) * len(y)
        correct += int((logits.detach().argmax(1) == y).sum())
        seen += len(y)
        n_syn += int(is_syn.sum())
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    return {"loss": tot_loss / max(seen, 1), "train_accuracy": correct / max(seen, 1),
            "synthetic_share": n_syn / max(seen, 1), "lr": lr, "steps": steps, "images": seen}


@torch.no_grad()
def predict_logits(model: nn.Module, loader, device) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) float32 logits and (N,) labels of every batch of `loader`."""
    model.eval()
    logits, labels = [], []
    for x, y, *_ in loader:
        logits.append(model(x.to(device)).float().cpu())
        labels.append(y)
    if not logits:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def evaluate(model: nn.Module, loader, accelerator) -> tuple[np.ndarray, np.ndarray]:
    """(y_true, y_pred) over the whole evaluation set, gathered from every process's share."""
    from accelerate.utils import gather_object

    logits, y = predict_logits(model, loader, accelerator.device)
    pred = logits.argmax(1) if len(logits) else np.zeros(0, np.int64)
    if accelerator.num_processes > 1:
        pairs = gather_object([(y.tolist(), pred.tolist())])
        y = np.asarray([v for t, _ in pairs for v in t], dtype=np.int64)
        pred = np.asarray([v for _, p in pairs for v in p], dtype=np.int64)
    return y, pred
