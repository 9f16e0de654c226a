"""Utilities every stage shares: named seeds, run paths, the config in TensorBoard, atomic folders, JSON lines."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from mvc import seeds
from mvc.config import make_config
from mvc.paths import RunPaths
from mvc.utils import MVCError, RunLogger, append_jsonl, atomic_dir, clean_stale_temps, read_jsonl


def test_seed_roles_are_independent_named_and_repeatable():
    a = seeds.derive_seed(0, "generate.image", 3, 1)
    assert a == seeds.derive_seed(0, "generate.image", 3, 1)  # repeatable
    others = {seeds.derive_seed(0, "generate.mixing", 3, 1), seeds.derive_seed(0, "generate.image", 1, 3),
              seeds.derive_seed(1, "generate.image", 3, 1), seeds.derive_seed(0, "finetune.step", 3, 1)}
    assert a not in others and len(others) == 4  # role, index order and base seed all matter
    assert 0 <= a < 2**63
    g1, g2 = seeds.generator(5, "tiny.vae"), seeds.generator(5, "tiny.vae")
    assert torch.equal(torch.randn(4, generator=g1), torch.randn(4, generator=g2))
    assert seeds.numpy_rng(5, "pairs", 2).integers(1 << 30) == seeds.numpy_rng(5, "pairs", 2).integers(1 << 30)
    assert seeds.derive_seed(0, "classifier.plan:concat", 1) != seeds.derive_seed(0, "classifier.plan:real", 1)
    with pytest.raises(ValueError, match="unknown seed role"):
        seeds.derive_seed(0, "no.such.role")
    drawn = seeds.resolve_seed(None)
    assert isinstance(drawn, int) and seeds.resolve_seed(7) == 7


def test_run_paths_keep_outputs_inside_the_run_folder(tmp_path):
    cfg = make_config(overrides={"run.output_dir": str(tmp_path / "run")})
    p = RunPaths.of(cfg)
    assert p.synthetic == tmp_path / "run" / "synthetic" and p.grids == tmp_path / "run" / "synthetic_grids"
    assert p.final == tmp_path / "run" / "mvc" / "final" and p.report == tmp_path / "run" / "results.md"
    cfg = make_config(overrides={"run.output_dir": str(tmp_path / "run"), "generate.out_dir": "syn2",
                                 "generate.model_dir": str(tmp_path / "elsewhere")})
    p = RunPaths.of(cfg)
    assert p.synthetic == tmp_path / "run" / "syn2" and p.grids == tmp_path / "run" / "syn2_grids"
    assert p.final == tmp_path / "elsewhere"  # an input: taken as given
    for key in ("pipeline.report", "generate.out_dir", "classifier.results_csv"):
        with pytest.raises(MVCError, match="leaves run.output_dir"):
            RunPaths.of(make_config(overrides={"run.output_dir": str(tmp_path / "run"), key: "../outside.md"}))
    # an absolute path is the user's explicit choice
    cfg = make_config(overrides={"run.output_dir": str(tmp_path / "run"), "pipeline.report": str(tmp_path / "r.md")})
    assert RunPaths.of(cfg).report == tmp_path / "r.md"


def test_config_goes_to_tensorboard_as_text_and_hparams(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_config(overrides={"run.output_dir": str(tmp_path)})
    log = RunLogger(tmp_path / "run")
    import dataclasses

    log.config(dataclasses.asdict(cfg), metrics=["test/accuracy"])
    log.scalars(1, {"accuracy": 0.5}, prefix="test/")
    log.close()
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    assert "config/text_summary" in acc.Tags()["tensors"]
    plugins = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(plugins)
    assert b"classifier.backbone" in plugins["_hparams_/session_start_info"]
    assert read_jsonl(tmp_path / "run" / "log.jsonl") == [{"step": 1, "test/accuracy": 0.5}]


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (target / "a.txt").read_text() == "1"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("2")
            raise RuntimeError("killed")
    assert (target / "a.txt").read_text() == "1" and sorted(os.listdir(tmp_path)) == ["model"]
    # the temp folder of a writer that died (no such pid) is cleaned; a live writer's is left alone
    dead, live = tmp_path / ".model.tmp-999999999", tmp_path / f".model.tmp-{os.getpid()}"
    dead.mkdir()
    live.mkdir()
    clean_stale_temps(tmp_path, "model")
    assert not dead.exists() and live.exists()


def test_append_after_a_torn_line_starts_a_fresh_line(tmp_path):
    path = tmp_path / "log.jsonl"
    append_jsonl(path, {"a": 1})
    with open(path, "a") as f:
        f.write('{"a": 2, "b"')  # a crash mid-line
    assert read_jsonl(path) == [{"a": 1}]
    append_jsonl(path, {"a": 3}, {"a": 4})
    assert read_jsonl(path) == [{"a": 1}, {"a": 3}, {"a": 4}]
    assert json.loads(Path(path).read_text().splitlines()[-1]) == {"a": 4}
