"""Learning-rate schedules: one registry, one helper, used by fine-tuning, the tiny base and classifiers.

A schedule maps progress t in [0, 1] (after the warm-up) to a multiplier of the base LR. `lr_multiplier`
adds a linear warm-up and a floor: warm-up steps ramp linearly to 1, then the schedule runs from 1 at
t = 0 down to `floor` at t = 1.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from mvc.core.registry import Registry, publish_choices

LR_SCHEDULES: Registry[Callable[..., float]] = Registry("LR schedule")
publish_choices("lr schedule", LR_SCHEDULES)


@LR_SCHEDULES.register("constant")
def constant(t: float, **_) -> float:
    """1 throughout."""
    return 1.0


@LR_SCHEDULES.register("cosine")
def cosine(t: float, **_) -> float:
    """Half a cosine from 1 to 0."""
    return 0.5 * (1.0 + math.cos(math.pi * min(max(t, 0.0), 1.0)))


@LR_SCHEDULES.register("linear")
def linear(t: float, **_) -> float:
    """Straight line from 1 to 0."""
    return 1.0 - min(max(t, 0.0), 1.0)


@LR_SCHEDULES.register("multistep")
def multistep(t: float, milestones: Sequence[float] = (0.5, 0.75), gamma: float = 0.1, **_) -> float:
    """x gamma at each milestone fraction passed."""
    return float(gamma) ** sum(t >= m for m in milestones)


def lr_multiplier(schedule: str, step: float, total: float, warmup: float = 0, floor: float = 0.0,
                  milestones: Sequence[float] = (0.5, 0.75), gamma: float = 0.1) -> float:
    """Multiplier of the base LR at `step` (may be fractional) of `total`: warm-up, then the schedule."""
    fn = LR_SCHEDULES.get(schedule)
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1e-12)
    return floor + (1.0 - floor) * fn(t, milestones=milestones, gamma=gamma)


def lambda_lr(optimizer, schedule: str, total: int, warmup: int = 0, floor: float = 0.0):
    """A torch LambdaLR following `lr_multiplier` (stepped once per optimizer step)."""
    from torch.optim.lr_scheduler import LambdaLR

    LR_SCHEDULES.get(schedule)  # unknown names fail here, not at the first step
    return LambdaLR(optimizer, lambda s: lr_multiplier(schedule, s, total, warmup, floor))
