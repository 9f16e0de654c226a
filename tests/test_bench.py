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
