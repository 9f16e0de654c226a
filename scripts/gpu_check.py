"""The GPU check's three parts around the run (scripts/gpu_check.sh runs them and scripts/_reproduce.sh between).

    python scripts/gpu_check.py prepare WORKDIR {gpu,cpu}        # prints the overrides, one per line
    python scripts/gpu_check.py peak OUT.json {gpu,cpu}          # the matmul peak of this machine
    python scripts/gpu_check.py summary WORKDIR PEAK.json OVERRIDE...   # one JSON summary; exit 1 if a check fails

`prepare`: the miniature run's set-up, on the GPU with an SD-1.5-wide stand-in and a run sized for a few
minutes; `peak`: the bf16 matmul throughput, the yardstick; `summary`: per stage its throughput, peak GPU memory
and the share of the peak its FLOPs reach, plus the miniature run's checks. docs/scripts.md has the details.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

DATASET = "caltech101"
WORDS = "faces leopards accordion airplanes anchor ant".split()


#################################################################################
#                                    prepare                                    #
#################################################################################

def gpu_scale() -> list[str]:
    """The overrides of the GPU run (after the miniature run's, which they replace where they overlap)."""
    env = os.environ.get
    return ["--train.resolution=256", "--train.batch_size=50", f"--train.max_steps={env('STEPS', '30')}",
            "--train.checkpoint_every=1000", "--train.validate_every=1000", "--train.log_every=10",
            "--generate.num_inference_steps=50", f"--generate.per_class={env('PER_CLASS', '16')}",
            "--dreambooth.resolution=256", "--dreambooth.max_steps=10", "--dreambooth.batch_size=4",
            "--dreambooth.num_class_images=4", "--dreambooth.prior_steps=50", "--dreambooth.checkpoint_every=1000",
            f"--classifier.steps={env('CLF_STEPS', '20')}", "--classifier.batch_size=50",
            "--classifier.input_size=224", "--classifier.num_workers=4", "--classifier.checkpoint_every=1000",
            "--classifier.eval_every=0", "--evaluate.reference_input_size=224"]


def write_full_width_sd15(folder: Path) -> None:
    """The SD-1.5 stand-in at SD-1.5's own widths (the miniature sizes blanked), replacing the folder."""
    import shutil

    import mvc.diffusion.standins as s

    s.SD15_MINI_UNET, s.SD15_MINI_VAE, s.SD15_MINI_TEXT = {}, {}, {}
    shutil.rmtree(folder, ignore_errors=True)
    s.save_sd15_structured(folder, WORDS)


def prepare(work: Path, mode: str) -> list[str]:
    """The miniature run's preparation; on the GPU the full-width base, a GPU accelerate config and the scale."""
    from tests.smoke import harness as smoke_full

    over = smoke_full.prepare(DATASET, work)
    if mode == "cpu":
        return over
    write_full_width_sd15(work / "models" / "sd15-structured")
    hf = Path(os.environ.get("HF_HOME", work / "hf"))
    smoke_full.write_accelerate_config(hf, os.environ.get("MVC_GPU_PRECISION", "fp16"), use_cpu=False)
    return over + gpu_scale()


#################################################################################
#                                      peak                                     #
#################################################################################

def peak(mode: str) -> dict:
    """The matmul yardstick: bf16 8192^3 on the GPU, fp32 1024^3 on the CPU."""
    import torch

    from mvc.core.perf import matmul_tflops

    if mode == "gpu":
        dev, n, dtype = torch.device("cuda"), 8192, torch.bfloat16
    else:
        dev, n, dtype = torch.device("cpu"), 1024, torch.float32
    tflops = matmul_tflops(dev, n, dtype, repeats=20 if mode == "gpu" else 3)
    return {"tflops": round(tflops, 3), "n": n, "dtype": str(dtype).split(".")[-1], "device": str(dev),
            "name": torch.cuda.get_device_name(dev) if mode == "gpu" else None}


#################################################################################
#                                    summary                                    #
#################################################################################

def unet_config(folder: Path) -> dict | None:
    """The U-Net config of a diffusers folder (None when missing)."""
    p = folder / "unet" / "config.json"
    return json.loads(p.read_text()) if p.is_file() else None


def share(flops_per_s: float | None, peak_tflops: float | None) -> float | None:
    """Achieved FLOP/s as a share of the peak."""
    if not flops_per_s or not peak_tflops:
        return None
    return round(flops_per_s / (peak_tflops * 1e12), 4)


def finetune_stage(paths, cfg, peak_tflops) -> dict:
    """The fine-tuning log's last interval: images/s, peak memory, checkpointing, and the FLOP share."""
    from mvc.core.perf import unet_flops
    from mvc.core.utils import read_jsonl

    log = read_jsonl(paths.mvc / "log.jsonl") if (paths.mvc / "log.jsonl").is_file() else []
    train = [r for r in log if "train/images_per_s" in r]
    setup = next((r for r in log if "setup/gradient_checkpointing" in r), {})
    config = unet_config(paths.final)
    if not train or config is None:
        return {"reached": False}
    last = train[-1]
    ips, res = last["train/images_per_s"], cfg.train.resolution
    ckpt = bool(setup.get("setup/gradient_checkpointing", cfg.train.gradient_checkpointing))
    per_image = unet_flops(config, 1, res // 8, 77, train=True) if config else None
    return {"reached": True, "steps": last["step"], "images_per_s": round(ips, 3), "resolution": res,
            "batch_size": cfg.train.batch_size, "gradient_checkpointing": ckpt,
            "peak_memory_gb": last.get("train/peak_memory_gb"), "gflop_per_image": round(per_image / 1e9, 3),
            "share_of_peak": share(per_image * ips, peak_tflops)}


def generator_stage(cfg, method: str, peak_tflops) -> dict:
    """A generator's last run (runs.jsonl): images/s, batch size, peak memory, and the U-Net FLOP share."""
    from mvc.core.paths import RunPaths
    from mvc.core.perf import unet_flops
    from mvc.core.utils import read_jsonl
    from mvc.generation.generators import img2img_steps
    from mvc.studies import pipeline

    gc = pipeline.generator_config(cfg, method)
    paths, g = RunPaths.of(gc), gc.generate
    runs = [r for r in read_jsonl(paths.grids / "runs.jsonl") if r.get("made")] if (
        paths.grids / "runs.jsonl").is_file() else []
    if not runs:
        return {"reached": False}
    r = runs[-1]
    model = {"mvc": paths.final, "dreambooth": paths.root / "dreambooth" / "final"}.get(method, Path(cfg.model.base))
    config, res = unet_config(Path(model)), int(r["resolution"])
    passes = {"mvc": g.num_inference_steps * 3, "img2img": img2img_steps(g.num_inference_steps, g.strength) * 2}.get(
        method, g.num_inference_steps * 2)  # rows per image: 3 (text + image guidance), 2 (text guidance)
    per_image = unet_flops(config, 1, res // 8, 77) * passes if config else None
    ips = r.get("images_per_s")
    return {"reached": True, "images": r["made"], "images_per_s": ips, "resolution": res, "dtype": r.get("dtype"),
            "batch_size": r.get("batch_size"), "peak_memory_gb": r.get("peak_memory_gb"),
            "unet_rows_per_image": passes, "gflop_per_image": round(per_image / 1e9, 3) if per_image else None,
            "share_of_peak": share(per_image * ips, peak_tflops) if per_image and ips else None}


def classifier_stage(cfg, out: Path, peak_tflops) -> dict:
    """The classifier runs' training steps/s (median), peak memory (max), and the backbone's FLOP share."""
    import torch

    from mvc.classifier.models import build_model
    from mvc.core.perf import count_flops

    recs = [json.loads(p.read_text()) for p in sorted(out.rglob("metrics.json"))]
    recs = [r for r in recs if "train_steps_per_s" in r]
    if not recs:
        return {"reached": False}
    sps = statistics.median(r["train_steps_per_s"] for r in recs)
    c, size = cfg.classifier, int(recs[0]["input_size"])
    with torch.device("meta"):
        model, _ = build_model(c.backbone, len(recs[0]["classes"]), False, c.cifar_stem, size)
        x = torch.zeros(2, 3, size, size)
    per_image = count_flops(lambda: model(x).float().sum().backward()) / 2  # forward + backward, per image
    peaks = [r["peak_memory_gb"] for r in recs if r.get("peak_memory_gb") is not None]
    return {"reached": True, "runs": len(recs), "backbone": c.backbone, "input_size": size,
            "batch_size": c.batch_size, "steps_per_s": round(sps, 3), "peak_memory_gb": max(peaks) if peaks else None,
            "gflop_per_image": round(per_image / 1e9, 3),
            "share_of_peak": share(per_image * c.batch_size * sps, peak_tflops)}


def summary(work: Path, peak_file: Path, argv: list[str]) -> tuple[dict, list[str]]:
    """The performance summary of a run and the miniature run's checks (failed ones listed)."""
    from mvc.core.config import build_parser, parse_args
    from mvc.core.paths import RunPaths
    from tests.smoke import harness as smoke_full

    cfg, _ = parse_args(build_parser("gpu_check"), ["--config", str(ROOT / "configs" / f"{DATASET}.yaml"), *argv])
    paths = RunPaths.of(cfg)
    pk = json.loads(peak_file.read_text()) if peak_file.is_file() else {}
    pt = pk.get("tflops")
    stages: dict = {}
    cap = paths.captions / "summary.json"
    if cap.is_file():
        c = json.loads(cap.read_text())
        stages["captioning"] = {"reached": True, "images": c["images"], "seconds": c["seconds"],
                                "images_per_s": round(c["images"] / c["seconds"], 3) if c["seconds"] else None,
                                "peak_memory_gb": c.get("peak_memory_gb"), "share_of_peak": None,
                                "note": "seconds include loading the captioner; a small BLIP-2 stand-in: not counted"}
    else:
        stages["captioning"] = {"reached": False}
    parts = [("fine-tuning", lambda: finetune_stage(paths, cfg, pt))]
    parts += [(f"generation ({m})", lambda m=m: generator_stage(cfg, m, pt)) for m in cfg.pipeline.generators]
    parts += [("classifiers", lambda: classifier_stage(cfg, paths.root, pt))]
    for name, fn in parts:
        try:
            stages[name] = fn()
        except Exception as e:  # one stage's record missing or odd keeps the others
            stages[name] = {"reached": None, "error": f"{type(e).__name__}: {e}"[:300]}
    try:
        smoke, fails = smoke_full.summary(DATASET, argv)
    except Exception as e:
        smoke, fails = None, [f"the miniature run's summary failed: {type(e).__name__}: {e}"[:300]]
    times, run = paths.stage_times, work / "run.json"
    out = {"dataset": DATASET, "run": json.loads(run.read_text()) if run.is_file() else None, "peak": pk,
           "stages": stages,
           "stage_times": json.loads(times.read_text()) if times.is_file() else None,
           "smoke": smoke, "checks": "passed" if not fails else fails}
    return out, fails


def main(argv: list[str]) -> int:
    """`prepare WORKDIR MODE`, `peak OUT MODE` or `summary WORKDIR PEAK OVERRIDE...`."""
    if len(argv) < 3 or argv[0] not in ("prepare", "peak", "summary"):
        print(__doc__, file=sys.stderr)
        return 2
    cmd = argv[0]
    if cmd == "prepare":
        print("\n".join(prepare(Path(argv[1]).resolve(), argv[2])))
        return 0
    if cmd == "peak":
        Path(argv[1]).write_text(json.dumps(peak(argv[2])) + "\n")
        return 0
    out, fails = summary(Path(argv[1]).resolve(), Path(argv[2]), argv[3:])
    print(json.dumps(out, indent=1, default=str))
    for f in fails:
        print(f"gpu_check: FAILED: {f}", file=sys.stderr)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
