"""Throughput of MVC generation: our batched path vs a plain loop calling the diffusers pipeline per image.

    .venv/bin/python bench/bench_generation.py [--profiles tiny sd15] [--threads 0]

What it measures and how: docs/benchmarks.md (`bench_generation.py`).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mvc.core.config import TinyBaseConfig  # noqa: E402
from mvc.core.seeds import generator  # noqa: E402
from mvc.core.utils import atomic_write_json, batched  # noqa: E402

# images, sources, batch size, steps and resolution of each profile
PROFILES = {"tiny": dict(images=16, sources=2, batch_size=16, steps=20, resolution=32),
            "sd15": dict(images=4, sources=2, batch_size=4, steps=10, resolution=256)}


def build_pipe(profile: str):
    """A random IP2P pipeline of the profile's shape (random weights are fine for throughput)."""
    from mvc.diffusion.models import build_sd15_shape, ip2p_pipeline, widen_conv_in
    from mvc.diffusion.tiny import build_tiny_components

    torch.manual_seed(0)
    if profile == "tiny":
        comps = build_tiny_components(TinyBaseConfig(), ["shirt", "trouser"], in_channels=8)
    else:
        comps = build_sd15_shape()
        comps["unet"] = widen_conv_in(comps["unet"])
    return ip2p_pipeline(comps, comps["unet"])  # as train_mvc.py saves it: Euler ancestral, no safety checker


def run_profile(profile: str) -> dict:
    """Run both paths of one profile on the same jobs; returns the raw figures."""
    from PIL import Image

    from mvc.diffusion.sd_io import encode_conditions, encode_prompts
    from mvc.generation.generators import render
    from mvc.generation.mixing import apply_mixing

    spec = PROFILES[profile]
    n_img, n_src, bsz, steps, res = (spec[k] for k in ("images", "sources", "batch_size", "steps", "resolution"))
    pipe = build_pipe(profile)
    rng = np.random.default_rng(0)
    sources = [Image.fromarray(rng.integers(0, 255, (res, res, 3), dtype=np.uint8)) for _ in range(n_src)]
    base = encode_prompts(pipe.tokenizer, pipe.text_encoder, [f"dark small shape, a photo of class type shirt {i}" for i in range(n_src)])
    params = dict(coarse_k=3, coarse_mode="shuffle", fine_m=3, fine_s=2, fine_source="self")
    # jobs: (source, variant, mixed embedding (1, T, D)), as generate_synthetic makes them
    jobs = []
    for j in range(n_img):
        s, v = j % n_src, j // n_src
        jobs.append((s, v, apply_mixing(base[s:s + 1], "coarse" if v % 2 == 0 else "fine", params,
                                        generator(0, "generate.mixing", s, v), window=(1, 5))))
    kw = dict(num_inference_steps=steps, guidance_scale=3.0, image_guidance_scale=1.5)

    # warm-up (first-call allocations), not timed
    pipe(prompt_embeds=jobs[0][2], image=sources[0], generator=generator(1, "generate.image", 0, 0), num_inference_steps=2)

    t0 = time.perf_counter()
    plain = [pipe(prompt_embeds=e, image=sources[s], generator=generator(0, "generate.image", s, v), **kw).images[0]
             for s, v, e in jobs]
    t_plain = time.perf_counter() - t0

    t0 = time.perf_counter()
    lat = encode_conditions(pipe.vae, sources, res)  # once per source
    neg = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""])  # once
    ours = []
    for batch in batched(jobs, bsz):
        ours += render(pipe, torch.cat([e for _, _, e in batch]), neg.expand(len(batch), -1, -1),
                       torch.stack([lat[s] for s, _, _ in batch]), [generator(0, "generate.image", s, v) for s, v, _ in batch],
                       steps, kw["guidance_scale"], kw["image_guidance_scale"])
    t_ours = time.perf_counter() - t0

    max_diff = max(int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max()) for a, b in zip(plain, ours))
    return {"profile": profile, **spec, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": platform.machine(), "plain_seconds": round(t_plain, 3), "batched_seconds": round(t_ours, 3),
            "plain_images_per_s": round(n_img / t_plain, 4), "batched_images_per_s": round(n_img / t_ours, 4),
            "speedup": round(t_plain / t_ours, 3), "max_pixel_diff": max_diff}


def main(argv=None) -> list[dict]:
    """Run the profiles, print a table, write bench/results/generation.json."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profiles", nargs="+", default=["tiny", "sd15"], choices=list(PROFILES))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "generation.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for prof in args.profiles:
        results.append(run_profile(prof))
        print(f"done {prof}", file=sys.stderr, flush=True)
    rows, notes = [], []
    print(f"{'profile':<8}{'path':<28}{'seconds':>10}{'images/s':>12}{'speed-up':>10}")
    for r in results:
        plain = {"profile": r["profile"], "path": "plain pipeline, 1 image per call", "seconds": r["plain_seconds"],
                 "images_per_s": r["plain_images_per_s"], "speedup": 1.0}
        ours = {"profile": r["profile"], "path": f"mvc.generation.generate, batch {r['batch_size']}",
                "seconds": r["batched_seconds"], "images_per_s": r["batched_images_per_s"], "speedup": r["speedup"]}
        for row in (plain, ours):
            rows.append(row)
            print(f"{row['profile']:<8}{row['path']:<28}{row['seconds']:>10.2f}{row['images_per_s']:>12.3f}"
                  f"{row['speedup']:>9.2f}x")
        notes.append(f"{r['profile']}: {r['images']} images from {r['sources']} sources, {r['steps']} steps, "
                     f"{r['resolution']} px, {r['threads']} threads; max pixel difference between the paths: "
                     f"{r['max_pixel_diff']}")
    notes.append("target: batched >= 2x the one-call-per-image loop on the tiny profile; the sd15 figure is reported")
    # the shape bench/run_all.py collates: a title, rows, notes
    atomic_write_json(args.out, {"title": "Generation: batched variants vs one diffusers pipeline call per image",
                                 "rows": rows, "notes": notes, "raw": results})
    return results


if __name__ == "__main__":
    main()
