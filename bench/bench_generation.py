"""Throughput of MVC generation: our batched path vs a plain loop calling the diffusers pipeline per image.

    .venv/bin/python bench/bench_generation.py [--images 16 --batch-size 16 --steps 20 --threads 0]

Both use the same random tiny InstructPix2Pix components (TinyBaseConfig defaults: 32 px), the same
scheduler (Euler ancestral), steps, guidance, mixed prompt embeddings and per-image generators.
- plain: `pipe(prompt_embeds=e[None], image=<PIL source>, generator=g)` once per image (the pipeline
  encodes the source image and the empty negative prompt on every call, U-Net batch = 3);
- batched (mvc.generate): condition latents and the negative embedding computed once per source,
  then `render` on batches of `--batch-size` images (U-Net batch = 3 x batch size).
Prints a table and writes bench/results/generation.json; also checks both give the same images.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mvc.config import TinyBaseConfig  # noqa: E402
from mvc.utils import atomic_write_json, batched, make_generator  # noqa: E402


def build_pipe():
    """A random tiny IP2P pipeline (random weights are fine for throughput)."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

    from mvc.tiny import build_tiny_components

    torch.manual_seed(0)
    comps = build_tiny_components(TinyBaseConfig(), ["shirt", "trouser"], in_channels=8)
    pipe = StableDiffusionInstructPix2PixPipeline(**comps, safety_checker=None, feature_extractor=None,
                                                  requires_safety_checker=False)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv=None) -> dict:
    """Run both paths on the same jobs and report images/s."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--sources", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "generation.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from PIL import Image

    from mvc.generate import encode_conditions, encode_prompts, render
    from mvc.mixing import apply_mixing

    pipe = build_pipe()
    res = 32
    rng = np.random.default_rng(0)
    sources = [Image.fromarray(rng.integers(0, 255, (res, res, 3), dtype=np.uint8)) for _ in range(args.sources)]
    base = encode_prompts(pipe, [f"dark small shape, a photo of class type shirt {i}" for i in range(args.sources)])
    params = dict(k=3, mode="shuffle", m=3, s=2, source="self")
    # jobs: (source, variant, mixed embedding (1, T, D)), as generate_synthetic makes them
    jobs = []
    for j in range(args.images):
        s, v = j % args.sources, j // args.sources
        jobs.append((s, v, apply_mixing(base[s:s + 1], "coarse" if v % 2 == 0 else "fine", params,
                                        make_generator(0, s, v, 1), window=(1, 5))))
    kw = dict(num_inference_steps=args.steps, guidance_scale=3.0, image_guidance_scale=1.5)

    # warm-up (first-call allocations), not timed
    pipe(prompt_embeds=jobs[0][2], image=sources[0], generator=make_generator(1, 0, 0), num_inference_steps=2)

    t0 = time.perf_counter()
    plain = [pipe(prompt_embeds=e, image=sources[s], generator=make_generator(0, s, v), **kw).images[0]
             for s, v, e in jobs]
    t_plain = time.perf_counter() - t0

    t0 = time.perf_counter()
    lat = encode_conditions(pipe, sources, res)  # once per source
    neg = encode_prompts(pipe, [""])  # once
    ours = []
    for batch in batched(jobs, args.batch_size):
        ours += render(pipe, torch.cat([e for _, _, e in batch]), neg.expand(len(batch), -1, -1),
                       torch.stack([lat[s] for s, _, _ in batch]), [make_generator(0, s, v) for s, v, _ in batch],
                       args.steps, kw["guidance_scale"], kw["image_guidance_scale"])
    t_ours = time.perf_counter() - t0

    max_diff = max(int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max()) for a, b in zip(plain, ours))
    result = {
        "images": args.images, "sources": args.sources, "batch_size": args.batch_size, "steps": args.steps,
        "resolution": res, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.machine(), "plain_seconds": round(t_plain, 3), "batched_seconds": round(t_ours, 3),
        "plain_images_per_s": round(args.images / t_plain, 4), "batched_images_per_s": round(args.images / t_ours, 4),
        "speedup": round(t_plain / t_ours, 3), "max_pixel_diff": max_diff,
    }
    print(f"{'path':<28}{'seconds':>10}{'images/s':>12}")
    print(f"{'plain pipeline, 1 per call':<28}{t_plain:>10.2f}{result['plain_images_per_s']:>12.3f}")
    print(f"{'mvc.generate, batch ' + str(args.batch_size):<28}{t_ours:>10.2f}{result['batched_images_per_s']:>12.3f}")
    print(f"speedup x{result['speedup']:.2f}; max pixel difference between the two paths: {max_diff}")
    # the shape bench/run_all.py collates: a title, rows, notes
    atomic_write_json(args.out, {
        "title": "Generation: batched variants vs one diffusers pipeline call per image",
        "rows": [{"path": "plain pipeline, 1 image per call", "seconds": result["plain_seconds"],
                  "images_per_s": result["plain_images_per_s"], "speedup": 1.0},
                 {"path": f"mvc.generate, batch {args.batch_size}", "seconds": result["batched_seconds"],
                  "images_per_s": result["batched_images_per_s"], "speedup": result["speedup"]}],
        "notes": [f"{args.images} images from {args.sources} sources, {args.steps} steps, {res} px, "
                  f"{result['threads']} threads; max pixel difference between the paths: {max_diff}; target >= 2x"],
        "raw": result})
    return result


if __name__ == "__main__":
    main()
