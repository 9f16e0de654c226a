"""The benchmarks still run against the current code (one short round each); their figures live in bench/."""

from __future__ import annotations

from pathlib import Path

import bench_finetune
import pytest
import run_all

ROOT = Path(__file__).resolve().parents[2]


def test_finetune_bench_times_all_three_variants_on_one_model(monkeypatch):
    # the tiny profile's components, at the smallest batch and cache (its 50-image batches time nothing more here)
    monkeypatch.setitem(bench_finetune.PROFILES, "tiny", {**bench_finetune.PROFILES["tiny"], "batch": 2, "images": 8,
                                                          "warmup": 1})
    res = bench_finetune.run_profile("tiny", rounds=1, steps=1, ops=True)
    rows = {r["variant"]: r for r in res["rows"]}
    assert list(rows) == ["straight", "cached", "ours"]
    assert all(r["timed_steps"] == 1 and r["s_per_step"] > 0 and r["device"] == "cpu" for r in rows.values())
    assert rows["straight"]["speedup"] == 1.0
    assert res["cache_seconds"] > 0 and res["unet_params_m"] > 1
    # the U-Net's FLOP rate is its counted FLOPs over each variant's step time, set against the matmul peak
    assert res["unet_gflop_per_step"] > 0 and res["matmul_peak_gflops"] > 0
    for r in rows.values():
        assert r["unet_gflop_per_s"] * r["s_per_step"] == pytest.approx(res["unet_gflop_per_step"])
        assert r["share_of_matmul_peak"] == pytest.approx(r["unet_gflop_per_s"] / res["matmul_peak_gflops"])
    # where our step goes: shares of the operators' own time, the U-Net's convolutions among them, and the FLOP
    # rate of the groups the flop counter sees (convolutions, linear layers, attention)
    groups = res["op_groups"]
    shares = [g["share_of_time"] for g in groups.values()]
    assert sum(shares) == pytest.approx(1.0) and shares == sorted(shares, reverse=True)
    assert groups["optimizer"]["share_of_time"] > 0 and groups["optimizer"]["gflop_per_s"] is None
    conv = groups["convolution"]
    assert conv["share_of_time"] > 0 and conv["gflop_per_s"] > 0
    assert conv["gflop_per_s"] * conv["share_of_time"] * rows["ours"]["s_per_step"] <= res["unet_gflop_per_step"]


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


@pytest.mark.slow
def test_gpu_bench_quick_measures_every_part_and_the_agreement_on_the_cpu(tmp_path, monkeypatch):
    """bench_gpu.py --quick: every fine-tuning variant and generation batch measured at a miniature width, the
    slow and fast paths agreeing (loss curves, images from the same seeds), one JSON written; a spent budget
    skips what is left instead of failing."""
    import json

    import bench_gpu

    # FLOPs are counted on the meta device, seconds per call; the second run counts the same U-Net again
    counted, count = {}, bench_gpu.perf.unet_flops

    def unet_flops(config, *args, **kw):
        key = json.dumps([config, args, kw], sort_keys=True, default=str)
        if key not in counted:
            counted[key] = count(config, *args, **kw)
        return counted[key]

    monkeypatch.setattr(bench_gpu.perf, "unet_flops", unet_flops)

    res = bench_gpu.main(["--quick", "--out", str(tmp_path / "gpu.json")])
    assert json.loads((tmp_path / "gpu.json").read_text())["rows"] == json.loads(json.dumps(res["rows"]))
    assert not res["errors"] and not res["skipped"] and res["matmul_peak"]["tflops"] > 0
    train = {r["variant"]: r for r in res["rows"] if r["part"] == "train"}
    assert set(train) == {"baseline", "all levers", "all levers, fp16 kept", "LoRA r8, all levers",
                          *(f"+ {k}" for k in bench_gpu.ONE_AT_A_TIME)}
    assert train["LoRA r8, all levers"]["lora_rank"] == 8
    assert all(r["images_per_s"] > 0 and r["tflops"] > 0 for r in train.values())
    assert train["baseline"]["speedup"] == 1.0 and train["baseline"]["checkpointing"]
    gen = [r for r in res["rows"] if r["part"] == "generate"]
    assert {r["batch"] for r in gen} == set(bench_gpu.QUICK.gen_batches) and all(r["images_per_s"] > 0 for r in gen)
    agree = res["agreement"]
    assert agree["train_fp16_kept"]["steps"] == bench_gpu.QUICK.agree_steps
    assert agree["train_fp16_kept"]["max_rel_diff"] < 0.02 and agree["train_bf16"]["max_rel_diff"] < 0.1
    assert agree["images"]["mean_abs_pixel_diff"] < 1.0 and agree["images"]["pixel_std"] > 1.0
    spent = bench_gpu.main(["--quick", "--budget-s", "0", "--out", str(tmp_path / "none.json")])
    assert spent["rows"] == [] and "train: baseline" in spent["skipped"] and "images" in spent["skipped"]


def test_stack_profile_files_samples_by_stage_component_and_activity(tmp_path):
    import profile_stacks

    root = "<module> (run_pipeline.py:182);main (run_pipeline.py:147);run_stage (run_pipeline.py:62)"
    raw = tmp_path / "demo.raw"
    raw.write_text("\n".join([
        f"{root};stage_finetune (run_pipeline.py:73);get_tiny_base (mvc/diffusion/tiny.py:400);"
        "pretrain_vae (mvc/diffusion/tiny.py:170);_update (mvc/diffusion/tiny.py:130);"
        "Tensor.backward (torch/_tensor.py:566);_engine_run_backward (torch/autograd/graph.py:1059) 40",
        f"{root};stage_evaluate (run_pipeline.py:99);evaluate_set (mvc/evaluation/evaluate.py:136);"
        "classification_accuracy_score (mvc/evaluation/evaluate.py:154);run_classifier (mvc/classifier/train.py:231);"
        "train_epoch (mvc/classifier/train.py:164) 10",
        f"{root};stage_evaluate (run_pipeline.py:99);evaluate_set (mvc/evaluation/evaluate.py:136) 10",
        "<module> (run_pipeline.py:1);_find_and_load (<frozen importlib._bootstrap>:1176) 20",
        "Thread._bootstrap (threading.py:1002);Condition.wait (threading.py:331) 500",  # an idle side thread
        "not a stack line",
    ]))
    table = profile_stacks.profile(profile_stacks.parse(raw.read_text().splitlines()), rate=20)
    assert table == {
        "fine-tuning (tiny base, captions, pairs, MVC)": {"tiny base: VAE pretraining / backward": 2.0},
        "evaluation (reference, metrics, CAS)": {"CAS classifier": 0.5, "synthetic-set metrics": 0.5},
        "outside the stages (start-up, config, report)": {"imports": 1.0},
    }
    text = profile_stacks.main([str(raw), "--rate", "20", "--out", str(tmp_path / "p.md")])
    assert text.startswith("Sampled wall time: 0.1 min.")  # 80 main-thread samples at 20 per second
    assert "| **fine-tuning (tiny base, captions, pairs, MVC)** | **0.03** | **50.0%** |" in text
    assert (tmp_path / "p.md").read_text() == text
