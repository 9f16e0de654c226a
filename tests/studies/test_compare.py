"""`make compare` (scripts/compare_generators.py) on the micro profile: every generator given, with and without
clustering-based sampling, under one protocol; one table, one figure, the real-only baselines once."""

from __future__ import annotations

import json
from pathlib import Path

import compare_generators
import pytest

from tests.helpers import micro_argv, write_fashion_idx

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_compare_runs_every_generator_in_each_sampling_mode_and_writes_one_table(tmp_path, one_thread):
    data = write_fashion_idx(tmp_path / "data", train_per_class=8)
    out = tmp_path / "out"
    argv = micro_argv(data, out, tmp_path / "cache", '--pipeline.generator_runs=["probabilistic"]',
                      "--sampling.clusters_per_class=2", "--sampling.min_coherence=-1", "--sampling.max_spread=1")
    argv += ["--generators", "txt2img", "img2img", "--baselines", "real"]
    report = compare_generators.cli(argv)
    root = Path(str(out) + "-compare")
    assert report == root / "compare.md"
    text = report.read_text()
    # one row per (generator, mode), each with its set's metrics and the accuracy of the generator run
    rows = json.loads((root / "compare.json").read_text())["rows"]
    assert [(r["generator"], r["sampling"]) for r in rows] == [
        ("txt2img", "none"), ("img2img", "none"), ("txt2img", "clusters"), ("img2img", "clusters")]
    for r in rows:
        assert 0 <= r["fidelity"] <= 1 and r["images"] > 0 and len(r["accuracy"]["probabilistic"]["accs"]) == 1
        assert f"| {r['generator']} | {r['sampling']} | {r['images']} |" in text
    # the modes are separate runs: the clustered sets were planned from the kept images and say so
    settings = json.loads((root / "clusters" / "synthetic_img2img_clusters" / "generation.json").read_text())
    assert "sampling" in json.dumps(settings)
    assert not (root / "none" / "synthetic_img2img" / "generation.json").read_text().count('"clusters"')
    # the real-only baseline is trained once (first mode), not per generator or mode
    assert "| real |" in text and not list((root / "clusters" / "classifier").glob("real-*"))
    assert (root / "figures" / "compare.png").stat().st_size > 0
