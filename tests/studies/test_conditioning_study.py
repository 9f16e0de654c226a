"""The conditioning study (supplement Fig. 4) at micro scale: every variant through the main job, one table, two
figures."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tests.helpers import micro_argv, write_fashion_idx


@pytest.mark.slow
def test_the_study_runs_each_conditioning_under_one_protocol(tmp_path, one_thread):
    import conditioning_study

    data = write_fashion_idx(tmp_path / "data")
    argv = micro_argv(data, tmp_path / "run", tmp_path / "cache", "--pipeline.seeds=[0]", "--generate.per_class=2")
    report = conditioning_study.cli([*argv, "--conditionings", "caption_shape", "image_direction", "--runs", "concat",
                                     "--baselines", "real"])
    out = tmp_path / "run-conditioning"
    text = report.read_text()
    rows = json.loads((out / "conditioning.json").read_text())["rows"]
    assert [r["generator"] for r in rows] == ["caption_shape", "image_direction"]
    assert all(r["images"] == 20 and r["accuracy"]["concat"]["accs"] for r in rows)  # 2 per class, 10 classes
    for name in ("caption_shape", "image_direction"):
        info = json.loads((out / name / "mvc" / "final" / "mvc_training.json").read_text())
        assert info["conditioning"] == name
    recs = [json.loads(line) for line in (out / "image_direction" / "synthetic" / "metadata.jsonl").open()]
    assert all(r["conditioning"] == "image_direction" and "partner_id" in r for r in recs)
    fig = Image.open(out / "figures" / "conditioning_images.png")
    assert fig.height >= 3 * 64  # the sources, then one row per conditioning
    assert "| image_direction | 20 |" in text and "| real |" in text
    assert "**Which conditioning?**" in text and "- image_direction: concat: vs caption_shape " in text  # against the first variant
