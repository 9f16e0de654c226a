"""Synthetic-data strategies: which images make each batch of each epoch, and at which LR scale.

A strategy never touches pixels. It works in one *combined index space* where indices
`0..n_real-1` are real images and `n_real..n_real+n_syn-1` are synthetic ones, and returns an
`EpochPlan`: the list of batches (index arrays) of one epoch plus the LR scale and the span of
the LR schedule. Plans are a pure function of (seed, epoch), so a resumed run replays exactly
the epochs it would have run, and every process of a DDP run agrees on the global plan (each
then takes its own share of the batches).

Importing this module is cheap (numpy only): config validation calls `list_strategies()`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from mvc import seeds
from mvc.registry import Registry
from mvc.utils import MVCError

STRATEGIES: Registry[type["Strategy"]] = Registry("strategy")
PROB_MODES = ("append", "replace")  # probabilistic: add the synthetic image to the batch / take the real one's place


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


@dataclass
class EpochPlan:
    """One epoch: batches of combined indices, the LR scale, and the schedule span of its phase."""
    batches: list[np.ndarray]
    lr_scale: float = 1.0
    phase: str = "main"
    phase_start: int = 0   # first epoch of this phase (the LR schedule restarts with each phase)
    phase_epochs: int = 1  # epochs in this phase

    def num_synthetic(self, n_real: int) -> int:
        """How many synthetic images the epoch shows."""
        return int(sum(int((b >= n_real).sum()) for b in self.batches))


#################################################################################
#                                 Strategies                                    #
#################################################################################

class Strategy:
    """Base class: `epoch_plan(epoch, seed)` gives the batches of one epoch."""
    name = "base"
    needs_synthetic = False

    def __init__(self, cfg, n_real: int, n_syn: int):
        if n_real < 1:
            raise MVCError("no real training images: check data.k_per_class and the dataset")
        if self.needs_synthetic and n_syn < 1:
            raise MVCError(f"strategy {self.name!r} needs synthetic images but none were found; "
                           f"run generate_mvc.py first, set classifier.synthetic_dir, or use --strategy real")
        self.cfg = cfg
        self.n_real = int(n_real)
        self.n_syn = int(n_syn) if self.needs_synthetic else 0
        self.epochs = int(cfg.epochs)
        self.batch_size = int(cfg.batch_size)

    @classmethod
    def tag_for(cls, cfg) -> str:
        """Short name used in run folders and the results CSV."""
        return cls.name

    def tag(self) -> str:
        """This strategy's tag (see `tag_for`)."""
        return self.tag_for(self.cfg)

    def epoch_plan(self, epoch: int, seed: int) -> EpochPlan:
        """The batches of `epoch` (0-based) for base seed `seed`."""
        raise NotImplementedError

    def _shuffled(self, n: int, epoch: int, seed: int, salt: str) -> list[np.ndarray]:
        """A seeded permutation of `0..n-1` cut into batches."""
        order = epoch_rng(seed, epoch, salt).permutation(n).astype(np.int64)
        return chunk(order, self.batch_size)


@STRATEGIES.register("real")
class RealOnly(Strategy):
    """Baseline: real images only (synthetic images are ignored)."""
    name = "real"

    def epoch_plan(self, epoch: int, seed: int) -> EpochPlan:
        """One shuffled pass over the real images."""
        return EpochPlan(self._shuffled(self.n_real, epoch, seed, "real"), phase_epochs=self.epochs)


@STRATEGIES.register("concat")
class Concat(Strategy):
    """Real ∪ synthetic as one shuffled dataset."""
    name = "concat"
    needs_synthetic = True

    def epoch_plan(self, epoch: int, seed: int) -> EpochPlan:
        """One shuffled pass over real and synthetic images together."""
        return EpochPlan(self._shuffled(self.n_real + self.n_syn, epoch, seed, "concat"), phase_epochs=self.epochs)


@STRATEGIES.register("synthetic_only")
class SyntheticOnly(Strategy):
    """Synthetic images only, tested on real ones: the classification accuracy score (CAS) of a synthetic set."""
    name = "synthetic_only"
    needs_synthetic = True

    def epoch_plan(self, epoch: int, seed: int) -> EpochPlan:
        """One shuffled pass over the synthetic images (indices n_real..n_real+n_syn-1)."""
        batches = self._shuffled(self.n_syn, epoch, seed, "synthetic_only")
        return EpochPlan([b + self.n_real for b in batches], phase_epochs=self.epochs)


@STRATEGIES.register("two_phase")
class TwoPhase(Strategy):
    """Phase 1 on real + synthetic; phase 2 (the last `two_phase_fraction` of the epochs) on real only
    at `two_phase_lr_scale` x LR. The LR schedule restarts at the phase switch (phase 2 is a short
    fine-tuning run of its own, as in the paper)."""
    name = "two_phase"
    needs_synthetic = True

    def __init__(self, cfg, n_real: int, n_syn: int):
        super().__init__(cfg, n_real, n_syn)
        frac = float(cfg.two_phase_fraction)
        p2 = int(round(self.epochs * frac))
        if frac > 0 and self.epochs > 1:
            p2 = max(p2, 1)  # a positive fraction always leaves at least one real-only epoch
        self.phase2_epochs = min(p2, self.epochs)
        self.phase1_epochs = self.epochs - self.phase2_epochs

    def epoch_plan(self, epoch: int, seed: int) -> EpochPlan:
        """Concat batches before the switch epoch, real-only batches with a scaled LR after it."""
        if epoch < self.phase1_epochs:
            return EpochPlan(self._shuffled(self.n_real + self.n_syn, epoch, seed, "phase1"),
                             phase="phase1", phase_start=0, phase_epochs=self.phase1_epochs)
        return EpochPlan(self._shuffled(self.n_real, epoch, seed, "phase2"), lr_scale=float(self.cfg.two_phase_lr_scale),
                         phase="phase2", phase_start=self.phase1_epochs, phase_epochs=self.phase2_epochs)


@STRATEGIES.register("probabilistic")
class Probabilistic(Strategy):
    """Each real image of a batch brings, with probability `prob_p`, one synthetic image:
    'append' adds it to the batch (the paper), 'replace' puts it in the real image's place (DA-Fusion).

    Synthetic images are drawn without replacement from a seeded stream of permutations of the
    synthetic pool, so over the run every synthetic image is used about equally often.
    """
    name = "probabilistic"
    needs_synthetic = True

    @classmethod
    def tag_for(cls, cfg) -> str:
        """'probabilistic' (append) or 'probabilistic_replace'."""
        return cls.name if cfg.prob_mode == "append" else f"{cls.name}_{cfg.prob_mode}"

    def epoch_plan(self, epoch: int, seed: int) -> EpochPlan:
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
        return EpochPlan(batches, phase_epochs=self.epochs)


def build_strategy(cfg, n_real: int, n_syn: int) -> Strategy:
    """Instantiate the strategy named by `cfg.strategy` (MVCError on an unknown name)."""
    return STRATEGIES.get(cfg.strategy)(cfg, n_real, n_syn)


def epochs_for_steps(cfg, n_real: int, n_syn: int, seed: int) -> int:
    """Epochs that give about `cfg.steps` optimizer steps with this strategy (at least 1).

    With a fixed step budget every strategy trains as long, whatever the size of its epoch
    (a real-only epoch of 200 images is 4 steps at batch 50; real + 800 synthetic is 20).
    """
    one = build_strategy(dataclasses.replace(cfg, epochs=1), n_real, n_syn)
    steps_per_epoch = max(1, len(one.epoch_plan(0, seed).batches))
    return max(1, math.ceil(cfg.steps / steps_per_epoch))
