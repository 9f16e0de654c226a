"""Peak memory (RSS high-water mark) of each stage on the micro profile, one fresh process per stage.

    .venv/bin/python bench/bench_memory.py [--profile configs/micro.yaml] [--keep DIR]

What it measures and how: docs/benchmarks.md (`bench_memory.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "bench" / "results" / "memory.json"
STAGES = ["imports", "tiny base", "fine-tuning", "generation", "classifier"]


def peak_mb() -> float:
    """This process's RSS high-water mark so far, in MB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _stage(name: str, argv: list[str]) -> dict:
    """Run one stage in this (fresh) process; its size and peak memory."""
    import accelerate  # noqa: F401
    import timm  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from diffusers import StableDiffusionInstructPix2PixPipeline  # noqa: F401

    import generate_mvc
    import train_classifier
    import train_mvc
    from mvc.core.config import build_parser, parse_args
    from mvc.core.utils import run_cli

    after_imports = peak_mb()
    cfg, _ = parse_args(build_parser("bench"), argv)
    t0 = time.perf_counter()
    size = ""
    if name == "tiny base":
        from mvc.data import load_splits
        from mvc.diffusion.tiny import get_tiny_base

        _, pool, _ = load_splits(cfg.data)
        get_tiny_base(cfg.tiny, pool, output_dir=cfg.run.output_dir, progress=False)
        size = f"{cfg.tiny.vae_steps}+{cfg.tiny.unet_steps} steps on {min(len(pool), cfg.tiny.pool_size or len(pool))} images"
    elif name == "fine-tuning":
        run_cli(train_mvc.cli, argv)
        size = f"{cfg.train.max_steps} steps, batch {cfg.train.batch_size}"
    elif name == "generation":
        summary = generate_mvc.cli(argv)
        size = f"{summary['made']} images, {cfg.generate.num_inference_steps} steps, batch {cfg.generate.batch_size}"
    elif name == "classifier":
        run_cli(train_classifier.cli, argv + ["--strategy", "probabilistic"])
        size = f"{cfg.classifier.epochs} epochs, {cfg.classifier.backbone} at {cfg.classifier.input_size} px"
    return {"stage": name, "size": size, "after_imports_MB": round(after_imports, 1),
            "peak_MB": round(peak_mb(), 1), "stage_MB": round(peak_mb() - after_imports, 1),
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> dict:
    """Run every stage in its own process and write the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)  # rest goes to the stage
    ap.add_argument("--profile", default=str(ROOT / "configs" / "micro.yaml"), help="config file of the stages")
    ap.add_argument("--keep", default=None, help="write the stage outputs here (default: a temporary folder)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # child mode
    args, rest = ap.parse_known_args(argv)
    if args.stage:  # child: one stage (`rest` holds its script arguments), a JSON line on stdout
        print("RESULT " + json.dumps(_stage(args.stage, rest)), flush=True)
        return {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        stage_argv = ["--config", args.profile, f"--run.output_dir={work / 'out'}",
                      f"--tiny.cache_dir={work / 'cache'}"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for name in STAGES:
            r = subprocess.run([sys.executable, __file__, "--stage", name, *stage_argv], cwd=ROOT, env=env,
                               capture_output=True, text=True)
            line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if r.returncode != 0 or line is None:
                print(r.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"stage {name!r} failed (exit {r.returncode})")
            rows.append(json.loads(line[len("RESULT "):]))
            print(f"{name:>12}: peak {rows[-1]['peak_MB']:8.1f} MB (+{rows[-1]['stage_MB']:.1f} MB over the imports)  "
                  f"{rows[-1]['size']}", flush=True)
    prof = Path(args.profile).resolve()
    notes = [f"config {prof.relative_to(ROOT) if prof.is_relative_to(ROOT) else prof}; "
             "each stage in a fresh process, RSS high-water mark from getrusage (ru_maxrss); after_imports_MB = "
             "the mark once torch, diffusers, transformers, accelerate and timm are imported; stage_MB = peak - "
             "after_imports.",
             "fine-tuning reuses the tiny base built by the previous stage (a cache hit), as a real run does after "
             "its first time; generation uses the fine-tuned folder of the stage before it."]
    from mvc.core.utils import atomic_write_json

    atomic_write_json(Path(args.out), {"title": "Peak memory per stage (micro profile, CPU)", "rows": rows, "notes": notes})
    print(f"wrote {args.out}")
    return {"rows": rows, "notes": notes}


if __name__ == "__main__":
    main()
