"""Utilities every stage shares: named seeds, run paths, the config in TensorBoard, atomic folders, JSON lines."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from mvc.core import seeds
from mvc.core.config import make_config
from mvc.core.paths import RunPaths
from mvc.core.utils import MVCError, RunLogger, append_jsonl, atomic_dir, clean_stale_temps, read_jsonl
from tests.helpers import no_hang


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


def test_atomic_files_get_the_users_umask(tmp_path):
    from mvc.core.checkpoint import save_checkpoint
    from mvc.core.utils import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        ckpt = save_checkpoint(tmp_path / "ck", 1, {}, {}, kind="test")
        os.umask(0o077)
        atomic_write_text(tmp_path / "b.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644  # mkstemp alone gives 0600
    assert ckpt.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o600


def test_temp_files_of_killed_writers_are_removed_at_the_next_start(tmp_path):
    from mvc.core.utils import atomic_path

    dead = 999999999  # no such process
    (tmp_path / "sub").mkdir()
    stale = [tmp_path / f".checkpoint-00000002.pt.tmp-{dead}-x8k2.pt", tmp_path / "sub" / f".a.png.tmp-{dead}-q1.png"]
    for p in stale:
        p.write_bytes(b"half")
    live = tmp_path / f".b.json.tmp-{os.getpid()}-z9.json"  # a writer of this process, still at work
    mine = tmp_path / ".notes.tmp"  # a user's file that only looks temporary
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir(exist_ok=True)
    (outside / f".c.png.tmp-{dead}-r.png").write_bytes(b"keep")
    (tmp_path / "link").symlink_to(outside)  # never followed
    for p in (live, mine):
        p.write_bytes(b"x")
    assert clean_stale_temps(tmp_path) == 1  # this folder only
    assert clean_stale_temps(tmp_path, recursive=True) == 1
    assert not any(p.exists() for p in stale) and live.exists() and mine.exists()
    assert (outside / f".c.png.tmp-{dead}-r.png").exists()
    # the name atomic_path gives its temp file is one clean_stale_temps knows
    with atomic_path(tmp_path / "d.txt") as tmp:
        assert tmp.name.startswith(f".d.txt.tmp-{os.getpid()}-") and tmp.suffix == ".txt"
        tmp.write_text("x")


def test_run_cli_prints_every_user_error_as_one_short_line(tmp_path, capsys):
    from mvc.core.utils import run_cli

    def run(exc: BaseException) -> tuple[int, str]:
        def main(argv):
            raise exc
        with pytest.raises(SystemExit) as e:
            run_cli(main, [])
        return e.value.code, capsys.readouterr().err

    code, err = run(MVCError("class 'a\nb' has\r one image\x1b[2J"))  # a name with a newline or an escape code
    assert code == 2 and err.count("\n") == 1 and "\\n" in err and "\x1b" not in err
    code, err = run(MVCError("x" * 100_000))
    assert code == 2 and err.count("\n") == 1 and len(err) < 2100
    code, err = run(PermissionError(13, "Permission denied", "/data/out/config.yaml"))
    assert code == 2 and err.count("\n") == 1 and "Permission denied" in err and "config.yaml" in err
    code, err = run(OSError(28, "No space left on device", "/data/out/x.png"))
    assert code == 2 and "No space left" in err
    with pytest.raises(FileNotFoundError):  # not the environment: a bug, shown in full
        run_cli(lambda argv: open(tmp_path / "missing" / "x"), [])


def test_logs_are_truncated_to_the_resumed_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = RunLogger(tmp_path)
    for step in range(1, 6):
        log.scalars(step, {"loss": float(step)})
    log.close()
    log = RunLogger(tmp_path, truncate_to=3)  # resumed after the checkpoint of step 3: steps 4, 5 come again
    for step in (4, 5):
        log.scalars(step, {"loss": 10.0 * step})
    log.close()
    assert [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "log.jsonl")] == \
        [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1), (2, 2), (3, 3), (4, 40), (5, 50)]
    RunLogger(tmp_path, truncate_to=-1).close()  # a fresh start keeps nothing of an earlier run
    assert read_jsonl(tmp_path / "log.jsonl") == []


def test_json_lines_readers_refuse_special_files(tmp_path):
    fifo = tmp_path / "metadata.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(MVCError, match="not a plain file"), no_hang():  # never opened: it would block forever
        read_jsonl(fifo)
    (tmp_path / "bad.jsonl").write_bytes(b'{"a": "\xff"}\n')
    with pytest.raises(MVCError, match="not UTF-8"):
        read_jsonl(tmp_path / "bad.jsonl")


def test_atomic_copy_replaces_a_link_instead_of_writing_through_it(tmp_path):
    from mvc.core.utils import atomic_copy

    outside = tmp_path / "outside.png"
    outside.write_bytes(b"user's")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "samples.png").symlink_to(outside)  # planted in the run folder
    (tmp_path / "grid.png").write_bytes(b"grid")
    atomic_copy(tmp_path / "grid.png", tmp_path / "run" / "samples.png")
    assert outside.read_bytes() == b"user's"
    assert not (tmp_path / "run" / "samples.png").is_symlink()
    assert (tmp_path / "run" / "samples.png").read_bytes() == b"grid"


def test_ctrl_c_mid_write_keeps_the_old_file_whole(tmp_path, capsys):
    from mvc.core.utils import atomic_path, atomic_write_text, run_cli

    target = tmp_path / "metadata.jsonl"
    atomic_write_text(target, "old\n")

    def main(argv):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        run_cli(main, [])
    assert e.value.code == 130 and "--resume latest" in capsys.readouterr().err
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["metadata.jsonl"]


#################################################################################
#                            RNG states in checkpoints                          #
#################################################################################

def _draws() -> tuple:
    import random

    import numpy as np

    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_states_round_trip_through_a_checkpoint_file(tmp_path):
    """What a resumed run draws from python, numpy and torch is what the uninterrupted one drew."""
    from mvc.core.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state

    seeds.seed_everything(3)
    _draws()
    path = save_checkpoint(tmp_path, 1, {"rng": rng_state()}, {})
    expected = _draws()
    seeds.seed_everything(4)  # somewhere else entirely
    set_rng_state(load_checkpoint(path)["rng"])
    assert _draws() == expected
    if not torch.cuda.is_available():
        assert "cuda" not in load_checkpoint(path)["rng"]  # saving never starts CUDA


def test_a_checkpoint_written_before_cuda_states_were_recorded_still_resumes(tmp_path):
    """The record as it was (python, numpy and torch CPU states only), saved and loaded as a checkpoint."""
    import random

    import numpy as np

    from mvc.core.checkpoint import FORMAT_VERSION, load_checkpoint, set_rng_state

    seeds.seed_everything(5)
    np_state = np.random.get_state()
    gauss = random.getstate()[2]
    old = {"python": [int(x) for x in random.getstate()[1]], "python_pos": -1 if gauss is None else gauss,
           "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
           "torch": torch.get_rng_state()}
    torch.save({"format_version": FORMAT_VERSION, "kind": "finetune", "trained_on": {}, "step": 2, "config": {},
                "rng": old}, tmp_path / "checkpoint-00000002.pt")
    expected = _draws()
    seeds.seed_everything(6)
    set_rng_state(load_checkpoint(tmp_path / "checkpoint-00000002.pt")["rng"])
    assert _draws() == expected


def test_a_cuda_state_of_other_devices_is_skipped_with_one_warning(caplog):
    """A CUDA state this process cannot take (another device count; no CUDA at all) restores the rest and says so."""
    from mvc.core.checkpoint import rng_state, set_rng_state

    seeds.seed_everything(7)
    state = rng_state()
    expected = _draws()
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * (n + 1)
    with caplog.at_level("WARNING", logger="mvc.core.checkpoint"):
        set_rng_state(state)
    assert _draws() == expected
    lines = [r.getMessage() for r in caplog.records if r.name == "mvc.core.checkpoint"]
    assert len(lines) == 1 and "\n" not in lines[0] and f"of {n + 1} device(s), this process sees {n}" in lines[0]
