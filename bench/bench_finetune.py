"""Benchmark: our cached InstructPix2Pix train step vs the straightforward one, side by side.

The straightforward step is what diffusers' examples/instruct_pix2pix/train_instruct_pix2pix.py does
every step: VAE-encode the target (posterior sample) and the condition (mode), tokenize and encode the
prompts, conditioning dropout, U-Net forward + backward, Adam step. Ours indexes latents and text
embeddings cached once before training (the one-off caching time is reported separately). Same
model, batch, precision (fp32) and optimizer; each variant runs in its own subprocess so that its
peak resident memory (resource.getrusage ru_maxrss) is its own.

Profiles: `tiny` (the tiny profile's default components, 32 px, batch 50) and `sd15` (U-Net, VAE and
CLIP text encoder built from hand-written SD-1.5 configs with random weights; 256 px, batch 1).

    .venv/bin/python bench/bench_finetune.py [--profiles tiny sd15] [--tiny-steps 20] [--sd-steps 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


#################################################################################
#                                  Components                                   #
#################################################################################

def sd15_components() -> dict:
    """SD-1.5-shaped components with random weights (mvc.models' configs, written from the published ones)."""
    from mvc.models import build_sd15_shape, widen_conv_in

    parts = build_sd15_shape()
    parts["unet"] = widen_conv_in(parts["unet"])
    return parts


def tiny_components() -> dict:
    """The tiny profile's default components (random weights; speed does not depend on them)."""
    from mvc.config import TinyBaseConfig
    from mvc.tiny import build_tiny_components

    return build_tiny_components(TinyBaseConfig(), [f"class{i}" for i in range(10)], in_channels=8)


PROFILES = {"tiny": dict(build=tiny_components, resolution=32, batch=50, images=200),
            "sd15": dict(build=sd15_components, resolution=256, batch=1, images=8)}


#################################################################################
#                                  One variant                                  #
#################################################################################

def run_variant(profile: str, variant: str, steps: int, warmup: int) -> dict:
    """Time `steps` train steps (after `warmup`) of one variant; returns steps/s and peak RSS."""
    import torch

    from mvc.finetune import (LatentCache, TextCache, conditioning_dropout_masks, draw_step_noise,
                              encode_prompts_cache, encode_text, gather_batch, ip2p_loss)
    from mvc.finetune_setup import freeze

    torch.manual_seed(0)
    spec = PROFILES[profile]
    c = spec["build"]()
    unet, vae, te, tok, sched = c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler"]
    freeze(vae, te)
    unet.train()
    opt = torch.optim.Adam(unet.parameters(), lr=1e-4)
    n, res, bsz = spec["images"], spec["resolution"], spec["batch"]
    pixels = torch.rand(n, 3, res, res) * 2 - 1  # preprocessed images, as a DataLoader would hand them over
    prompts = [f"dark small item {i}, a photo of class type class{i % 10}" for i in range(n)]
    gen = torch.Generator().manual_seed(0)
    cache_s = 0.0
    if variant == "cached":
        t0 = time.perf_counter()
        with torch.no_grad():
            means, stds = [], []
            for i in range(0, n, 64):
                d = vae.encode(pixels[i:i + 64]).latent_dist
                means.append(d.mean[:, None])
                stds.append(d.std[:, None])
        lat = LatentCache(torch.cat(means), torch.cat(stds), vae.config.scaling_factor)
        txt = encode_prompts_cache(tok, te, prompts, show_progress=False)
        cache_s = time.perf_counter() - t0
        shape = tuple(lat.mean.shape[2:])
    else:
        side = res // 2 ** (len(vae.config.block_out_channels) - 1)  # latent side
        shape = (vae.config.latent_channels, side, side)
        empty = encode_text(tok, te, [""])[0]

    def step():
        cond = torch.randint(0, n, (bsz,), generator=gen)
        tgt = torch.randint(0, n, (bsz,), generator=gen)
        rnd = draw_step_noise(bsz, shape, sched.config.num_train_timesteps, False, 0.05, 0.05, 0.05, gen)
        if variant == "cached":
            b = gather_batch(lat, txt, cond, tgt, tgt, rnd)
        else:  # what the diffusers example does per step
            with torch.no_grad():
                target = vae.encode(pixels[tgt]).latent_dist.sample(gen) * vae.config.scaling_factor
                cond_lat = vae.encode(pixels[cond]).latent_dist.mode()
                emb = encode_text(tok, te, [prompts[int(i)] for i in tgt])
            kt, ki = conditioning_dropout_masks(bsz, 0.05, 0.05, 0.05, gen)
            emb = torch.where(kt[:, None, None], emb, empty[None])
            b = {"cond_latents": cond_lat * ki[:, None, None, None], "target_latents": target, "text_embeds": emb}
        loss = ip2p_loss(unet, sched, **b, noise=rnd.noise, timesteps=rnd.timesteps).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dt = time.perf_counter() - t0
    return {"profile": profile, "variant": variant, "steps": steps, "batch": bsz, "resolution": res,
            "steps_per_s": steps / dt, "images_per_s": steps * bsz / dt, "cache_seconds": cache_s,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "unet_params_m": sum(p.numel() for p in unet.parameters()) / 1e6,
            "threads": torch.get_num_threads()}


#################################################################################
#                                     Main                                      #
#################################################################################

def main() -> None:
    """Run each (profile, variant) in a subprocess, print a table and write bench/results/finetune.json."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profiles", nargs="+", default=["tiny", "sd15"], choices=list(PROFILES))
    p.add_argument("--tiny-steps", type=int, default=20)
    p.add_argument("--sd-steps", type=int, default=3)
    p.add_argument("--worker", nargs=4, metavar=("PROFILE", "VARIANT", "STEPS", "WARMUP"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        prof, var, steps, warm = args.worker
        print("RESULT " + json.dumps(run_variant(prof, var, int(steps), int(warm))))
        return
    rows = []
    for prof in args.profiles:
        steps, warm = (args.tiny_steps, 3) if prof == "tiny" else (args.sd_steps, 1)
        for var in ("cached", "straight"):
            r = subprocess.run([sys.executable, __file__, "--worker", prof, var, str(steps), str(warm)],
                               capture_output=True, text=True)
            line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
            if r.returncode != 0 or not line:
                sys.exit(f"{prof}/{var} failed:\n{r.stderr[-3000:]}")
            rows.append(json.loads(line[0][7:]))
            print(f"done {prof}/{var}", file=sys.stderr)
    print(f"{'profile':8} {'variant':9} {'batch':>5} {'px':>4} {'steps/s':>9} {'img/s':>8} {'cache s':>8} "
          f"{'peak MB':>8} {'speed-up':>8}")
    summary = {}
    for r in rows:
        ref = next(x for x in rows if x["profile"] == r["profile"] and x["variant"] == "straight")
        ratio = r["steps_per_s"] / ref["steps_per_s"]
        summary[r["profile"]] = summary.get(r["profile"], ratio) if r["variant"] == "straight" else ratio
        print(f"{r['profile']:8} {r['variant']:9} {r['batch']:5d} {r['resolution']:4d} {r['steps_per_s']:9.3f} "
              f"{r['images_per_s']:8.2f} {r['cache_seconds']:8.2f} {r['peak_rss_mb']:8.0f} {ratio:8.2f}x")
    out = ROOT / "bench" / "results" / "finetune.json"
    from mvc.utils import atomic_write_json

    atomic_write_json(out, {"rows": rows, "speedup_cached_over_straight": summary})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
