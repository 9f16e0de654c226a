"""Fault tests: a SIGKILLed fine-tuning or generation process, and a truncated checkpoint.

One micro set-up per module (configs/micro.yaml on a 10-class Fashion-MNIST idx fixture of 16-px
images written here): the tiny base is built once and an uninterrupted 6-step fine-tuning run is the
reference. The processes that get killed are real subprocesses of the user-facing scripts; the
reruns go through the same entry points in-process (`run_cli(script.cli, argv)`) to save start-up
time.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest

import generate_mvc
import train_mvc
from mvc.core.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint
from mvc.core.utils import read_jsonl, run_cli
from mvc.data.synthetic import class_folder
from tests.helpers import max_weight_diff, micro_argv, unet_weights, write_fashion_idx

ROOT = Path(__file__).resolve().parents[2]

STEPS = 6  # fine-tuning steps of every run here
TRAIN = [f"--train.max_steps={STEPS}", "--train.checkpoint_every=1", "--train.checkpoints_keep=3"]
PER_CLASS = 4  # synthetic images per class in the killed generation (10 classes -> 40 images)


#################################################################################
#                         Fixture data and helpers                             #
#################################################################################

def spawn(script: str, argv: list[str], log: Path) -> subprocess.Popen:
    """Start a user-facing script as a real process (output to `log`, so no pipe can fill up)."""
    # one thread, as in the test process (conftest's `one_thread`): equal results, and no spin-waiting on a busy machine
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, str(ROOT / script), *argv], cwd=ROOT, env=env,
                                stdout=f, stderr=subprocess.STDOUT)


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], log: Path, timeout: float = 240) -> None:
    """SIGKILL `proc` as soon as `ready()` holds; fail if it ends (or hangs) before that."""
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the process ended (exit {proc.returncode}) before it could be killed:\n"
                        f"{log.read_text()[-3000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            proc.wait()
            pytest.fail(f"the process did not reach the kill point in {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def micro(tmp_path_factory, one_thread):
    """Fixture data, a tiny-base cache, and an uninterrupted reference fine-tuning run."""
    base = tmp_path_factory.mktemp("faults")
    data = write_fashion_idx(base / "data")
    cache = base / "cache"
    ref = base / "ref"
    run_cli(train_mvc.cli, micro_argv(data, ref, cache, *TRAIN))
    assert (ref / "mvc" / "final" / "model_index.json").is_file()
    return SimpleNamespace(base=base, data=data, cache=cache, ref=ref)


#################################################################################
#                                Fine-tuning                                    #
#################################################################################

@pytest.mark.slow
def test_killed_finetuning_resumes_to_the_same_weights(micro, tmp_path):
    out = tmp_path / "run"
    argv = micro_argv(micro.data, out, micro.cache, *TRAIN)
    kill_at = random.randint(1, STEPS - 2)  # a random step with at least one checkpoint, not the last
    ckpt_dir = out / "mvc" / "checkpoints"
    log = tmp_path / "train.log"
    proc = spawn("train_mvc.py", argv, log)
    kill_when(proc, lambda: checkpoint_path(ckpt_dir, kill_at).is_file(), log)
    assert not (out / "mvc" / "final").exists(), "killed too late: the run had finished"
    steps = [int(p.stem.split("-")[1]) for p in list_checkpoints(ckpt_dir)]
    assert steps and kill_at <= max(steps) < STEPS, (kill_at, steps)

    run_cli(train_mvc.cli, argv + ["--resume", "latest"])
    diff = max_weight_diff(unet_weights(micro.ref / "mvc" / "final"), unet_weights(out / "mvc" / "final"))
    assert diff < 1e-5, f"killed after step {kill_at} (checkpoints {steps}): weights differ by {diff}"
    # the resumed run logged only the steps it ran, after those of the killed one, each step once
    logged = [r["step"] for r in read_jsonl(out / "mvc" / "log.jsonl") if "train/loss" in r]
    assert logged == list(range(1, STEPS + 1)), logged


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(micro, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(micro.ref / "mvc" / "checkpoints", out / "mvc" / "checkpoints")
    shutil.copy(micro.ref / "mvc" / "log.jsonl", out / "mvc" / "log.jsonl")  # it logged every step, the last too
    ckpts = list_checkpoints(out / "mvc" / "checkpoints")
    assert [p.name for p in ckpts][-2:] == [f"checkpoint-{STEPS - 1:08d}.pt", f"checkpoint-{STEPS:08d}.pt"]
    newest = ckpts[-1]
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # a truncated file, as a full disk or a bad copy leaves it
    # what a writer killed during a checkpoint write leaves (its process is gone)
    stale = out / "mvc" / "checkpoints" / f".checkpoint-{STEPS + 1:08d}.pt.tmp-999999999-k2j4.pt"
    stale.write_bytes(data[:100])

    with caplog.at_level(logging.WARNING):
        run_cli(train_mvc.cli, micro_argv(micro.data, out, micro.cache, *TRAIN, "--resume", "latest"))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(newest.name in m and "unreadable" in m for m in warned), warned
    # it resumed at step STEPS - 1, ran the last step again and rewrote that checkpoint whole; the log holds
    # each step once (the killed run's record of the replayed step is gone), and the temp file is removed
    logged = [r["step"] for r in read_jsonl(out / "mvc" / "log.jsonl") if "train/loss" in r]
    assert logged == list(range(1, STEPS + 1))
    assert not stale.exists()
    assert load_checkpoint(newest)["step"] == STEPS
    diff = max_weight_diff(unet_weights(micro.ref / "mvc" / "final"), unet_weights(out / "mvc" / "final"))
    assert diff < 1e-5, diff


#################################################################################
#                                 Generation                                    #
#################################################################################

def _pngs(folder: Path) -> list[str]:
    """Class-folder PNGs of a synthetic set, relative paths, sorted (not the hidden temporary file of a write the
    kill may have interrupted: the test checks separately that none is left)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.glob("*/*.png") if not p.name.startswith("."))


@pytest.mark.slow
def test_killed_generation_reruns_to_a_complete_consistent_set(micro, tmp_path):
    from PIL import Image

    out = tmp_path / "run"
    syn = out / "synthetic"
    argv = micro_argv(micro.data, out, micro.cache, f"--generate.model_dir={micro.ref / 'mvc' / 'final'}",
                      f"--generate.per_class={PER_CLASS}", "--generate.batch_size=2")
    planned = 10 * PER_CLASS
    kill_after = random.randint(2, 12)
    log = tmp_path / "generate.log"
    proc = spawn("generate_mvc.py", argv, log)
    kill_when(proc, lambda: len(_pngs(syn)) >= kill_after, log)
    before = _pngs(syn)
    assert kill_after <= len(before) < planned, f"killed too late: {len(before)} of {planned} images"

    run_cli(generate_mvc.cli, argv)
    files = _pngs(syn)
    meta = read_jsonl(syn / "metadata.jsonl")
    listed = [r["file"] for r in meta]
    assert len(files) == planned, f"killed after {len(before)} images; {len(files)} of {planned} after the rerun"
    assert sorted(listed) == files and len(set(listed)) == len(listed), "metadata and files must match 1:1"
    assert set(before) <= set(files)
    # no temporary file of an interrupted write, no per-rank part file left behind
    assert not [p for p in syn.rglob(".*")], list(syn.rglob(".*"))
    assert not list(syn.glob("metadata.rank*.jsonl"))
    for rec in meta:
        with Image.open(syn / rec["file"]) as im:
            im.load()  # raises on a truncated file
            assert im.size == (16, 16)
            assert rec["file"].split("/")[0] == class_folder(rec["label"], rec["class_name"], 10)
    per_class = np.bincount([r["label"] for r in meta], minlength=10)
    assert per_class.tolist() == [PER_CLASS] * 10
    settings = json.loads((syn / "generation.json").read_text())["settings"]
    assert settings["seed"] == 0
