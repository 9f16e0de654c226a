"""The benchmarks still run against the current code (one short round each); their figures live in bench/."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import bench_finetune  # noqa: E402
import run_all  # noqa: E402


def test_finetune_bench_times_all_three_variants_on_one_model():
    res = bench_finetune.run_profile("tiny", rounds=1, steps=1)
    rows = {r["variant"]: r for r in res["rows"]}
    assert list(rows) == ["straight", "cached", "ours"]
    assert all(r["timed_steps"] == 1 and r["s_per_step"] > 0 and r["device"] == "cpu" for r in rows.values())
    assert rows["straight"]["speedup"] == 1.0
    assert res["cache_seconds"] > 0 and res["unet_params_m"] > 1


def test_results_tables_are_markdown():
    lines = run_all.table([{"variant": "ours", "speedup": 2.125}, {"variant": "straight", "speedup": 1.0}])
    assert lines == ["| variant | speedup |", "|---|---|", "| ours | 2.12 |", "| straight | 1 |"]
    assert run_all.table([]) == ["(no rows)"]


def test_summary_updates_the_benchmarks_that_ran_and_keeps_the_others(tmp_path, monkeypatch):
    import json

    (tmp_path / "results").mkdir()
    (tmp_path / "RESULTS.md").write_text("# Benchmarks\n\nold header\n\n## Kept\n\n| a |\n|---|\n| 1 |\n\n"
                                         "## Rerun\n\n| a |\n|---|\n| old |\n")
    (tmp_path / "results" / "x.json").write_text(json.dumps({"title": "Rerun", "rows": [{"a": "new"}],
                                                             "notes": ["measured now"]}))
    monkeypatch.setattr(run_all, "HERE", tmp_path)
    text = run_all.summarize().read_text()
    assert "old header" not in text and "| old |" not in text
    assert text.index("## Kept") < text.index("## Rerun")  # the earlier order is kept
    assert "| 1 |" in text and "| new |" in text and "- measured now" in text
