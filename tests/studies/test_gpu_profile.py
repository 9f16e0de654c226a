"""configs/gpu.yaml at micro scale on the CPU: the GPU profile's whole main job (four generators, the long runs at
its budget factor, the answer section) runs through run_pipeline.py, resumes, and its long runs keep folders of
their own; the verdict says 'yes' only beyond the seed spread."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import run_pipeline
from mvc.core.config import build_parser, load_yaml, make_config, parse_args
from mvc.core.utils import MVCError
from mvc.studies.report import beats, verdict_lines
from tests.helpers import write_fashion_idx

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # whole pipelines at micro scale: seconds to minutes each

GPU = ROOT / "configs" / "gpu.yaml"

# Scale only: sizes, steps and counts of configs/micro.yaml; the structure (a VAE with one downsampling, a
# three-level U-Net, the generators, the long runs) stays the GPU profile's.
MICRO_SCALE = [
    "--data.k_per_class=2", "--pairs.rounds=2", "--tiny.image_size=16", "--tiny.vae_channels=[8, 16]",
    "--tiny.unet_channels=[16, 32, 32]", "--tiny.text_hidden=16", "--tiny.text_layers=1", "--tiny.max_length=24",
    "--tiny.pool_size=40", "--tiny.vae_steps=3", "--tiny.unet_steps=3", "--tiny.batch_size=8", "--tiny.num_samples=4",
    "--tiny.sample_steps=2", "--train.resolution=16", "--train.batch_size=8", "--train.max_steps=4",
    "--train.checkpoint_every=2", "--train.validate_every=1000", "--train.num_validation=2",
    "--train.validation_steps=2", "--train.log_every=1", "--mixing.coarse_k=2", "--mixing.fine_m=2",
    "--generate.per_class=2", "--generate.num_inference_steps=2", "--generate.batch_size=8",
    "--generate.grid_sources=2", "--textual_inversion.steps=4", "--textual_inversion.batch_size=4",
    "--textual_inversion.checkpoint_every=2", "--classifier.input_size=16", "--classifier.steps=4",
    "--classifier.batch_size=10", "--classifier.test_limit=20", "--evaluate.reference_input_size=16",
    "--evaluate.reference_epochs=1", "--pipeline.seeds=[0]", "--pipeline.runs=[real, real+randaugment, probabilistic]",
    "--pipeline.generator_runs=[probabilistic]",
]


def gpu_argv(data: Path, out: Path, cache: Path) -> list[str]:
    """configs/gpu.yaml at micro scale on the fixture data, writing under `out` and caching under `cache`."""
    return ["--config", str(GPU), f"--data.root={data}", f"--run.output_dir={out}", f"--tiny.cache_dir={cache / 'tiny'}",
            f"--evaluate.cache_dir={cache / 'reference'}", *MICRO_SCALE]


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory, one_thread):
    """One micro run of the GPU profile's main job."""
    base = tmp_path_factory.mktemp("gpu_profile")
    data = write_fashion_idx(base / "data")
    out = base / "out"
    argv = gpu_argv(data, out, base / "cache")
    return out, run_pipeline.cli(argv), argv


def test_the_shipped_gpu_config_keeps_its_structure():
    cfg, _ = parse_args(build_parser("test"), ["--config", str(GPU)])
    run_pipeline.check_runs(cfg)
    assert cfg.tiny.vae_channels == [16, 32] and cfg.tiny.image_size // 2 == 16  # 16x16x4 latents
    assert cfg.pipeline.generators == ["mvc", "mvc_nomix", "img2img", "textual_inversion"]
    assert cfg.pipeline.runs == [
        "real", "real+randaugment", "real+fastautoaugment", "concat", "two_phase", "probabilistic"]
    assert cfg.pipeline.seeds == [0, 1, 2] and cfg.pipeline.long_factor == 5
    runs = run_pipeline.long_runs(cfg)
    assert [(lc.generate.method, run, lc.classifier.steps) for lc, run in runs] == [
        ("mvc", "real+randaugment", 1000), ("mvc", "probabilistic", 1000), ("mvc_nomix", "probabilistic", 1000)]


def test_every_generator_and_the_long_runs_end_in_one_report(gpu_run):
    out, report, _ = gpu_run
    text = report.read_text()
    for name in ("synthetic", "synthetic_mvc_nomix", "synthetic_img2img", "synthetic_textual_inversion"):
        assert json.loads((out / "evaluation" / name / "metrics.json").read_text())["images"] == 20
    # the long runs: their own folders, 5x the steps, a table of their own
    for name in ("real-randaugment-resnet10t-steps20-seed0", "probabilistic-standard-resnet10t-steps20-seed0",
                 "probabilistic-standard-resnet10t-mvc_nomix-steps20-seed0"):
        m = json.loads((out / "classifier" / name / "metrics.json").read_text())
        assert m["steps"] == 20
    assert json.loads((out / "classifier" / "real-randaugment-resnet10t-seed0" / "metrics.json").read_text())[
        "steps"] == 4
    assert "at 5x the budget" in text and "20 optimizer steps for every run" in text
    assert "### Does the mvc set help?" in text
    assert "- 5x budget, probabilistic on the mvc set: **no**" in text  # one seed never tells a difference
    assert "Machine: CPU only" in text


def test_a_rerun_redoes_nothing(gpu_run, capsys):
    out, report, argv = gpu_run
    before = {p: p.stat().st_mtime_ns for p in (out / "classifier").glob("*/metrics.json")}
    run_pipeline.cli(argv)
    assert {p: p.stat().st_mtime_ns for p in (out / "classifier").glob("*/metrics.json")} == before
    times = json.loads((out / "stage_times.json").read_text())
    assert "classifiers (probabilistic@mvc_nomix, 5x budget)" in times


def _row(gen, accs, run="probabilistic"):
    import numpy as np

    return {"run": run, "generator": gen, "accs": accs, "acc_mean": float(np.mean(accs)),
            "acc_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0}


def test_the_verdict_says_yes_only_beyond_the_seed_spread():
    real = _row(None, [70.0, 70.5, 69.5], run="real+randaugment")
    clear = _row("mvc", [75.0, 75.5, 74.5])
    noisy = _row("mvc", [71.0, 68.0, 73.0])
    assert beats(clear, real) and not beats(real, clear)
    assert not beats(noisy, real)  # higher mean, inside the spread
    assert not beats(_row("mvc", [80.0]), _row(None, [70.0]))  # one seed
    lines = verdict_lines([real, clear, _row("mvc_nomix", [74.8, 75.4, 74.9])], "mvc", "equal budget")
    assert lines[0].startswith("- equal budget, probabilistic on the mvc set: **no**")  # mixing not beyond spread
    assert "vs mvc_nomix: 75.00 vs 75.03" in lines[0]
    lines = verdict_lines([real, clear, _row("mvc_nomix", [70.0, 70.2, 69.9])], "mvc", "equal budget")
    assert "**yes**" in lines[0]


def test_long_runs_are_checked_before_any_stage():
    tree = load_yaml(GPU)
    for bad, msg in (("probabilistic@dreambooth", "not in pipeline.generators"),
                     ("real@mvc_nomix", "uses no synthetic image"), ("nonsense", "unknown run")):
        cfg = make_config(tree, {"pipeline.long_runs": [bad]})
        with pytest.raises(MVCError, match=msg):
            run_pipeline.check_runs(cfg)
