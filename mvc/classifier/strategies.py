"""Synthetic-data strategies: which images make each batch of each epoch, and at which LR scale.

A strategy never touches pixels: in one combined index space (real images first, then synthetic ones) it
returns an `EpochPlan` (batches, LR scale, place in its phase's schedule), a pure function of (seed, epoch), so
a resumed run replays exactly and every DDP process agrees on the global plan. Every run of a comparison gets
the same budget of optimizer steps (`step_budget`). Importing this module is cheap (numpy only): config
validation calls `list_strategies()`. docs/strategies.md explains the budget and each strategy's epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mvc.core import seeds
from mvc.core.registry import Registry, publish_choices
from mvc.core.utils import MVCError

STRATEGIES: Registry[type["Strategy"]] = Registry("strategy")
PROB_MODES = ("append", "replace")  # probabilistic: add the synthetic image to the batch / take the real one's place
publish_choices("strategy", STRATEGIES)
publish_choices("probabilistic mode", PROB_MODES)


def list_strategies() -> list[str]:
    """Names of the registered strategies (cheap: no heavy import)."""
    return STRATEGIES.names()


def epoch_rng(seed: int, epoch: int, salt: str) -> np.random.Generator:
    """A numpy Generator for one stream (`salt`) of one epoch's plan, independent of every other draw."""
    return seeds.numpy_rng(seed, f"classifier.plan:{salt}", epoch)


def chunk(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Split `order` into batches of `batch_size`; a trailing batch of one image joins the previous one
    (BatchNorm cannot train on a batch of one)."""
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < 2:
        last = batches.pop()  # popped first: `batches[-2] = f(batches.pop())` would assign one place too early
        batches[-1] = np.concatenate([batches[-1], last])
    return batches


def num_batches(n: int, batch_size: int) -> int:
    """len(chunk(range(n), batch_size)), without drawing anything."""
    k = -(-n // batch_size)
    return k - 1 if k > 1 and n - (k - 1) * batch_size < 2 else k


def step_budget(cfg, n_real: int, world: int = 1) -> int:
    """Optimizer steps of every run of a comparison: `cfg.steps`, else `cfg.epochs` real-only epochs' worth.

    With `world` processes an optimizer step takes `world` batches (one per process), so a real-only
    epoch is `num_batches(n_real, batch_size) // world` steps.
    """
    if getattr(cfg, "steps", None):
        return int(cfg.steps)
    return int(cfg.epochs) * max(1, num_batches(n_real, int(cfg.batch_size)) // world)


@dataclass
class EpochPlan:
    """One epoch: batches of combined indices, the LR scale, and its place in its phase's LR schedule."""
    batches: list[np.ndarray]
    lr_scale: float = 1.0
    phase: str = "main"
    phase_step: int = 0    # optimizer steps of this phase before this epoch (the LR schedule restarts per phase)
    phase_steps: int = 1   # optimizer steps of the whole phase

    def num_synthetic(self, n_real: int) -> int:
        """How many synthetic images the epoch shows."""
        return int(sum(int((b >= n_real).sum()) for b in self.batches))

    @property
    def num_images(self) -> int:
        """How many images the epoch shows (every process's batches together)."""
        return int(sum(len(b) for b in self.batches))


@dataclass(frozen=True)
class Phase:
    """A stretch of the budget with its own data, LR scale and LR schedule span."""
    name: str
    steps: int
    lr_scale: float = 1.0


#################################################################################
#                                 Strategies                                    #
#################################################################################

class Strategy:
    """Base class: the budget's phases, and the batches of one full pass over a phase's data.

    `epoch_plan(epoch, seed)` gives the run's epochs in order: full passes over each phase's data,
    the last one of a phase cut where the phase's share of the budget ends.
    """
    name = "base"
    needs_synthetic = False

    def __init__(self, cfg, n_real: int, n_syn: int, world: int = 1):
        if n_real < 1:
            raise MVCError("no real training images: check data.k_per_class and the dataset")
        if self.needs_synthetic and n_syn < 1:
            raise MVCError(f"strategy {self.name!r} needs synthetic images but none were found; "
                           f"run generate_mvc.py first, set classifier.synthetic_dir, or use --strategy real")
        self.cfg = cfg
        self.n_real = int(n_real)
        self.n_syn = int(n_syn) if self.needs_synthetic else 0
        self.batch_size = int(cfg.batch_size)
        self.world = int(world)
        self.total_steps = step_budget(cfg, self.n_real, self.world)
        self.phases = [p for p in self.split(self.total_steps) if p.steps > 0]
        self._table = self._epoch_table()

    @classmethod
    def tag_for(cls, cfg) -> str:
        """Short name used in run folders and the results CSV."""
        return cls.name

    def tag(self) -> str:
        """This strategy's tag (see `tag_for`)."""
        return self.tag_for(self.cfg)

    # --- what a strategy defines -------------------------------------------------
    def split(self, total: int) -> list[Phase]:
        """The budget's phases (one by default)."""
        return [Phase("main", total)]

    def pass_size(self, phase: str) -> int:
        """Images in one full pass over the phase's data (what its batches are cut from)."""
        raise NotImplementedError

    def pass_batches(self, phase: str, epoch: int, seed: int) -> list[np.ndarray]:
        """The batches of one full pass over the phase's data, drawn for the run's `epoch`."""
        raise NotImplementedError

    # --- the run's epochs ------------------------------------------------------
    def _epoch_table(self) -> list[tuple[Phase, int, int]]:
        """(phase, optimizer steps of the epoch, steps of the phase before it) for every epoch of the run."""
        table = []
        for ph in self.phases:
            per = num_batches(self.pass_size(ph.name), self.batch_size) // self.world
            if per < 1:
                raise MVCError(f"an epoch of {self.name} ({ph.name}) has fewer batches than the {self.world} "
                               f"processes; lower classifier.batch_size")
            done = 0
            while done < ph.steps:
                n = min(per, ph.steps - done)
                table.append((ph, n, done))
                done += n
        return table

    @property
    def epochs(self) -> int:
        """Epochs of the run (the last one of each phase may be short)."""
        return len(self._table)

    def phase_steps(self) -> dict[str, int]:
        """{phase: optimizer steps}: how the budget is split."""
        return {p.name: p.steps for p in self.phases}

    def epoch_plan(self, epoch: int, seed: int) -> EpochPlan:
        """The batches of `epoch` (0-based) for base seed `seed`: `world` batches per optimizer step."""
        ph, n, done = self._table[epoch]
        batches = self.pass_batches(ph.name, epoch, seed)[:n * self.world]
        return EpochPlan(batches, lr_scale=ph.lr_scale, phase=ph.name, phase_step=done, phase_steps=ph.steps)

    def _shuffled(self, n: int, epoch: int, seed: int, salt: str) -> list[np.ndarray]:
        """A seeded permutation of `0..n-1` cut into batches."""
        order = epoch_rng(seed, epoch, salt).permutation(n).astype(np.int64)
        return chunk(order, self.batch_size)


@STRATEGIES.register("real")
class RealOnly(Strategy):
    """Baseline: real images only (synthetic images are ignored)."""
    name = "real"

    def pass_size(self, phase: str) -> int:
        return self.n_real

    def pass_batches(self, phase: str, epoch: int, seed: int) -> list[np.ndarray]:
        """A shuffled pass over the real images."""
        return self._shuffled(self.n_real, epoch, seed, "real")


@STRATEGIES.register("concat")
class Concat(Strategy):
    """Real ∪ synthetic as one shuffled dataset."""
    name = "concat"
    needs_synthetic = True

    def pass_size(self, phase: str) -> int:
        return self.n_real + self.n_syn

    def pass_batches(self, phase: str, epoch: int, seed: int) -> list[np.ndarray]:
        """A shuffled pass over real and synthetic images together."""
        return self._shuffled(self.n_real + self.n_syn, epoch, seed, "concat")


@STRATEGIES.register("synthetic_only")
class SyntheticOnly(Strategy):
    """Synthetic images only, tested on real ones: the classification accuracy score (CAS) of a synthetic set."""
    name = "synthetic_only"
    needs_synthetic = True

    def pass_size(self, phase: str) -> int:
        return self.n_syn

    def pass_batches(self, phase: str, epoch: int, seed: int) -> list[np.ndarray]:
        """A shuffled pass over the synthetic images (indices n_real..n_real+n_syn-1)."""
        return [b + self.n_real for b in self._shuffled(self.n_syn, epoch, seed, "synthetic_only")]


@STRATEGIES.register("two_phase")
class TwoPhase(Strategy):
    """Phase 1 on real + synthetic; phase 2 (the last `two_phase_fraction` of the step budget) on real only
    at `two_phase_lr_scale` x LR. The LR schedule restarts at the switch (phase 2 is a short fine-tuning
    run of its own, as in the paper)."""
    name = "two_phase"
    needs_synthetic = True

    def split(self, total: int) -> list[Phase]:
        """Phase 2 gets round(fraction x budget) steps (at least one for a positive fraction), phase 1 the rest."""
        frac = float(self.cfg.two_phase_fraction)
        p2 = int(round(total * frac))
        if frac > 0 and total > 1:
            p2 = max(p2, 1)
        p2 = min(p2, total)
        return [Phase("phase1", total - p2), Phase("phase2", p2, float(self.cfg.two_phase_lr_scale))]

    def pass_size(self, phase: str) -> int:
        return self.n_real + self.n_syn if phase == "phase1" else self.n_real

    def pass_batches(self, phase: str, epoch: int, seed: int) -> list[np.ndarray]:
        """Concat batches in phase 1, real-only batches in phase 2."""
        if phase == "phase1":
            return self._shuffled(self.n_real + self.n_syn, epoch, seed, "phase1")
        return self._shuffled(self.n_real, epoch, seed, "phase2")


@STRATEGIES.register("probabilistic")
class Probabilistic(Strategy):
    """Each real image of a batch brings, with probability `prob_p`, one synthetic image:
    'append' adds it to the batch (the paper), 'replace' puts it in the real image's place (DA-Fusion).

    Synthetic images are drawn without replacement from a seeded stream of permutations of the
    synthetic pool, so over the run every synthetic image is used about equally often. An epoch is a
    pass over the real images, so with 'append' a step sees about (1 + prob_p) x batch_size images.
    """
    name = "probabilistic"
    needs_synthetic = True

    @classmethod
    def tag_for(cls, cfg) -> str:
        """'probabilistic' (append) or 'probabilistic_replace'."""
        return cls.name if cfg.prob_mode == "append" else f"{cls.name}_{cfg.prob_mode}"

    def pass_size(self, phase: str) -> int:
        return self.n_real

    def pass_batches(self, phase: str, epoch: int, seed: int) -> list[np.ndarray]:
        """Real batches with synthetic indices appended / substituted at rate `prob_p`."""
        rng = epoch_rng(seed, epoch, "probabilistic")
        real = chunk(rng.permutation(self.n_real).astype(np.int64), self.batch_size)
        # one Bernoulli draw per real image, (n_real,), then one synthetic index per success
        hits = rng.random(self.n_real) < float(self.cfg.prob_p)
        n_hits = int(hits.sum())
        reps = -(-n_hits // self.n_syn) if n_hits else 0
        stream = (np.concatenate([rng.permutation(self.n_syn) for _ in range(reps)]) if reps
                  else np.empty(0, dtype=np.int64)).astype(np.int64) + self.n_real
        batches, h0, s0 = [], 0, 0
        for b in real:
            mask = hits[h0:h0 + len(b)]
            k = int(mask.sum())
            syn = stream[s0:s0 + k]
            if self.cfg.prob_mode == "append":
                b = np.concatenate([b, syn])
            else:
                b = b.copy()
                b[mask] = syn
            batches.append(b)
            h0 += len(mask)
            s0 += k
        return batches


def build_strategy(cfg, n_real: int, n_syn: int, world: int = 1) -> Strategy:
    """Instantiate the strategy named by `cfg.strategy` (MVCError on an unknown name) for `world` processes."""
    return STRATEGIES.get(cfg.strategy)(cfg, n_real, n_syn, world)
