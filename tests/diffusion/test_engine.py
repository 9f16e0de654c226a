"""The diffusion-training engine with a small task of its own (a linear model, real accelerate, real checkpoints):
the cadence of sync points, a resumed run equals an uninterrupted one (weights, losses, schedule, global RNGs, log),
the first non-finite loss stops the run before anything is written, and a checkpoint trained on anything else is
refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mvc.core.checkpoint import list_checkpoints
from mvc.core.distributed import make_accelerator
from mvc.core.utils import MVCError, read_jsonl
from mvc.diffusion.engine import Cadence, Task, draw_noise, train


class LineTask(Task):
    """Fit y = sum(x) with a linear layer; x from the step's generator, a little noise from the global RNG (so a
    resume must restore the RNG state too); the loss turns NaN from step `nan_from` on."""
    kind, label, prefix, step_role = "toy", "toy", "toy/", "finetune.step"
    nonfinite_fix = "lower the rate"

    def __init__(self, nan_from: int | None = None):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(4, 1)
        self.params = list(self.model.parameters())
        self.optimizer = torch.optim.Adam(self.params, lr=0.05)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0 / (1 + s))
        self.max_grad_norm, self.seed, self.images_per_step = 1.0, 7, 8
        self.nan_from, self.exported = nan_from, None

    def models(self) -> list:
        return [self.model]

    def set_prepared(self, models: list) -> None:
        self.model = models[0]

    def draw_index(self, step: int, micro: int) -> tuple[int, ...]:
        return (step, micro)

    def restore(self, ckpt: dict | None) -> None:
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model"])

    def state(self) -> dict:
        return {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()}}

    def loss(self, step, micro, generator):
        x = torch.randn(8, 4, generator=generator)
        y = x.sum(1, keepdim=True) + 0.01 * torch.randn(8, 1)  # the global RNG
        per = (self.model(x) - y).pow(2).mean(1)
        if self.nan_from is not None and step + 1 >= self.nan_from:
            per = per * float("nan")
        return per.mean(), per.mean().detach()

    def export(self, step: int, result: dict) -> None:
        self.exported = step


def run(out: Path, max_steps: int, resume: str | None = None, trained_on: dict | None = None, **kw) -> tuple:
    task = LineTask(kw.pop("nan_from", None))
    cadence = Cadence(max_steps, kw.pop("log_every", 1), kw.pop("checkpoint_every", 3), 5)
    res = train(task, make_accelerator(), out, cadence, {"toy": True}, trained_on or {"lr": 0.05}, resume=resume,
                progress=False)
    return task, res


def test_cadence_logs_at_its_steps_the_first_and_the_last_and_saves_at_checkpoints():
    c = Cadence(max_steps=10, log_every=4, checkpoint_every=5, checkpoints_keep=2)
    assert [s for s in range(1, 11) if c.points(s)[0]] == [1, 4, 8, 10]
    assert [s for s in range(1, 11) if c.points(s)[2]] == [5, 10]
    assert not any(c.points(s)[1] for s in range(1, 11))  # no validation without validate_every
    both = Cadence(10, 4, 5, 2, validate_every=3, log_at_checkpoints=True)
    assert [s for s in range(1, 11) if both.points(s)[0]] == [1, 4, 5, 8, 10]
    assert [s for s in range(1, 11) if both.points(s)[1]] == [3, 6, 9, 10]


def test_draw_noise_replays_and_draws_in_its_order():
    t, noise, eps = draw_noise(3, (2, 4, 4), 1000, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    assert torch.equal(t, torch.randint(0, 1000, (3,), generator=g))
    assert torch.equal(noise, torch.randn((3, 2, 4, 4), generator=g))
    assert torch.equal(eps, torch.randn((3, 2, 4, 4), generator=g))


def test_resume_equals_uninterrupted(tmp_path):
    straight, ref = run(tmp_path / "a", 6)
    first, a = run(tmp_path / "b", 3)
    second, b = run(tmp_path / "b", 6, resume="latest")
    assert a["losses"] + b["losses"] == ref["losses"] and len(ref["losses"]) == 6
    for p, q in zip(straight.model.parameters(), second.model.parameters()):
        assert torch.equal(p, q)
    assert second.lr_scheduler.get_last_lr() == straight.lr_scheduler.get_last_lr()
    assert [r["step"] for r in read_jsonl(tmp_path / "b" / "log.jsonl") if "toy/loss" in r] == [1, 2, 3, 4, 5, 6]
    assert (first.exported, second.exported) == (3, 6)
    ckpt = torch.load(list_checkpoints(tmp_path / "b" / "checkpoints")[-1], weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "rng", "world_size", "kind", "trained_on", "step"} <= set(ckpt)


def test_first_non_finite_loss_stops_before_any_checkpoint_or_export(tmp_path):
    """Losses are read at sync points only: the NaN of step 3 is found at the checkpoint of step 4, named by its step,
    and neither that checkpoint nor the export is written."""
    with pytest.raises(MVCError, match=r"^non-finite loss \(nan\) at step 3; lower the rate$"):
        run(tmp_path, 6, nan_from=3, log_every=100, checkpoint_every=4)
    assert not list_checkpoints(tmp_path / "checkpoints")


def test_a_checkpoint_trained_on_other_settings_is_refused_in_one_line(tmp_path):
    run(tmp_path, 2)
    with pytest.raises(MVCError) as e:
        run(tmp_path, 4, resume="latest", trained_on={"lr": 0.1})
    assert "\n" not in str(e.value) and "lr: 0.05 -> 0.1" in str(e.value)
