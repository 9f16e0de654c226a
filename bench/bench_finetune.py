"""Benchmark: our InstructPix2Pix train step vs the straightforward one, side by side in one process.

    .venv/bin/python bench/bench_finetune.py [--profiles tiny sd15] [--rounds 0] [--steps 0] [--ops]
    .venv/bin/python bench/bench_finetune.py --profiles base --base runwayml/stable-diffusion-v1-5 --base-batch 8

What it measures and how: docs/benchmarks.md (`bench_finetune.py`).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("straight", "cached", "ours")

# what `--ops` files each operator's own time under (first match of the aten name, in this order)
OP_GROUPS = (("convolution", ("convolution",)), ("attention", ("scaled_dot_product", "attention")),
             ("matmul (linear layers)", ("aten::mm", "aten::addmm", "aten::bmm")),
             ("optimizer", ("adam", "optimizer")), ("normalisation", ("norm",)),
             ("activations", ("silu", "gelu", "sigmoid")),
             ("copies and layout", ("copy", "cat", "clone", "contiguous", "empty", "view", "reshape", "transpose",
                                    "permute", "as_strided", "slice", "split", "chunk")),
             ("elementwise", ("add", "mul", "div", "sub", "sum", "mean", "pow", "sqrt", "exp", "neg", "where")))
# the flop counter's operators by group (counted on the meta device, where attention runs as batched products)
FLOP_GROUPS = {"aten.convolution": "convolution", "aten.convolution_backward": "convolution",
               "aten.mm": "matmul (linear layers)", "aten.addmm": "matmul (linear layers)", "aten.bmm": "attention"}


#################################################################################
#                                  Components                                   #
#################################################################################

def sd15_components() -> dict:
    """SD-1.5-shaped components with random weights (mvc.diffusion.models' configs, written from the published ones)."""
    from mvc.diffusion.models import build_sd15_shape, widen_conv_in

    parts = build_sd15_shape()
    parts["unet"] = widen_conv_in(parts["unet"])
    return parts


def tiny_components() -> dict:
    """The tiny profile's default components (random weights; speed does not depend on them)."""
    from mvc.core.config import TinyBaseConfig
    from mvc.diffusion.tiny import build_tiny_components

    return build_tiny_components(TinyBaseConfig(), [f"class{i}" for i in range(10)], in_channels=8)


def base_components(base: str) -> dict:
    """The components of a diffusers text-to-image folder or hub id (real weights), U-Net widened."""
    from mvc.diffusion.models import load_pipeline_components, widen_conv_in

    parts = load_pipeline_components(base)
    parts["unet"] = widen_conv_in(parts["unet"])
    return parts


# rounds x steps timed steps per variant, after `warmup` untimed steps each
PROFILES = {"tiny": dict(build=tiny_components, resolution=32, batch=50, images=200, warmup=3, rounds=5, steps=4),
            "sd15": dict(build=sd15_components, resolution=256, batch=1, images=8, warmup=1, rounds=3, steps=1),
            "base": dict(build=base_components, resolution=256, batch=1, images=64, warmup=2, rounds=3, steps=3)}


#################################################################################
#                               One profile                                     #
#################################################################################

def op_shares(step, steps: int) -> dict[str, float]:
    """Each OP_GROUPS group's share of the CPU time of `steps` calls of `step` (torch's profiler, operators' own
    time): where a step goes, in a few lines."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    own: dict[str, float] = {}
    for ev in prof.key_averages():
        name = ev.key.lower()
        if not name.startswith("aten::") and "optimizer" not in name:
            continue  # autograd and profiler wrappers: their time is their operators'
        group = next((g for g, keys in OP_GROUPS if any(k in name for k in keys)), "other")
        own[group] = own.get(group, 0.0) + ev.self_cpu_time_total
    total = sum(own.values()) or 1.0
    return {g: own[g] / total for g in sorted(own, key=own.get, reverse=True)}


def run_profile(profile: str, rounds: int, steps: int, device: str = "cpu", base: str | None = None,
                base_batch: int = 1, base_resolution: int = 256, ops: bool = False) -> dict:
    """Time the three variants of one profile in alternating rounds; returns rows and notes. Each row also has the
    U-Net's FLOP rate (torch's flop counter) against this device's fp32 matmul peak, measured in the same process;
    `ops`: where "ours" spends its step, by operator group (CPU)."""
    import torch

    from mvc.core import perf
    from mvc.core.config import FinetuneConfig
    from mvc.diffusion.finetune import LatentCache, draw_step_noise, encode_prompts_cache, gather_batch, ip2p_loss
    from mvc.diffusion.finetune_setup import build_adam, freeze, prepare_unet
    from mvc.diffusion.sd_io import encode_images, encode_prompts

    torch.manual_seed(0)
    spec = dict(PROFILES[profile])
    rounds, steps = rounds or spec["rounds"], steps or spec["steps"]
    dev = torch.device(device)
    if profile == "base":
        spec["batch"], spec["resolution"] = base_batch, base_resolution
        c = spec["build"](base)
    else:
        c = spec["build"]()
    unet, vae, te, tok, sched = c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler"]
    for m in (unet, vae, te):
        m.to(dev)
    freeze(vae, te)
    tc = FinetuneConfig(fused_adam=False)  # the default Adam; "ours" switches the fused flag on
    opt = build_adam(prepare_unet(unet, tc), tc)
    n, res, bsz = spec["images"], spec["resolution"], spec["batch"]
    pixels = (torch.rand(n, 3, res, res) * 2 - 1).to(dev)  # preprocessed images, as a DataLoader hands them over
    prompts = [f"dark small item {i}, a photo of class type class{i % 10}" for i in range(n)]
    gen = torch.Generator().manual_seed(0)

    t0 = time.perf_counter()  # the one-off cache of the cached variants
    mean, std = encode_images(vae, pixels)  # (n, C, h, w) each
    lat = LatentCache(mean[:, None], std[:, None], vae.config.scaling_factor).to(dev)
    txt = encode_prompts_cache(tok, te, prompts, show_progress=False).to(dev)
    cache_s = time.perf_counter() - t0
    shape = tuple(lat.mean.shape[2:])

    def step(variant: str) -> float:
        t = time.perf_counter()
        cond = torch.randint(0, n, (bsz,), generator=gen).to(dev)
        tgt = torch.randint(0, n, (bsz,), generator=gen).to(dev)
        rnd = draw_step_noise(bsz, shape, sched.config.num_train_timesteps, False, 0.05, 0.05, 0.05, gen).to(dev)
        if variant == "straight":  # what the diffusers example does per step
            with torch.no_grad():
                post = vae.encode(pixels[tgt]).latent_dist
                target = (post.mean + post.std * rnd.eps) * vae.config.scaling_factor  # a posterior sample
                cond_lat = vae.encode(pixels[cond]).latent_dist.mode()
                emb = encode_prompts(tok, te, [prompts[int(i)] for i in tgt])
            emb = torch.where(rnd.keep_text[:, None, None], emb, txt.empty[None])  # conditioning dropout
            b = {"cond_latents": cond_lat * rnd.keep_image[:, None, None, None], "target_latents": target,
                 "text_embeds": emb}
        else:
            b = gather_batch(lat, txt, cond, tgt, tgt, rnd)
        for g in opt.param_groups:
            g["fused"] = variant == "ours" or None
        loss = ip2p_loss(unet, sched, **b, noise=rnd.noise, timesteps=rnd.timesteps).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for v in VARIANTS:
        for _ in range(spec["warmup"]):
            step(v)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        for v in VARIANTS[r % 3:] + VARIANTS[:r % 3]:  # rotate the order every round
            step(v)  # untimed: the first step after a switch pays for the other variant's memory churn
            times[v] += [step(v) for _ in range(steps)]
            print(f"  {profile} round {r + 1}/{rounds} {v}: {statistics.median(times[v][-steps:]):.3f} s/step",
                  file=sys.stderr, flush=True)
    med = {v: statistics.median(t) for v, t in times.items()}
    # the U-Net's forward + backward by operator, counted on the meta device; the yardstick: an fp32 matmul here
    by_op = perf.unet_flops(unet.config, bsz, shape[-1], text_len=txt.empty.shape[0], train=True, by_op=True)
    gflop = sum(by_op.values()) / 1e9
    peak = perf.matmul_tflops(dev, 2048 if dev.type == "cpu" else 8192, torch.float32, repeats=5) * 1e3
    rows = [{"profile": profile, "variant": v, "batch": bsz, "resolution": res, "timed_steps": len(times[v]),
             "s_per_step": med[v], "steps_per_s": 1 / med[v], "images_per_s": bsz / med[v],
             "speedup": med["straight"] / med[v], "unet_gflop_per_s": gflop / med[v],
             "share_of_matmul_peak": gflop / med[v] / peak, "device": dev.type} for v in VARIANTS]
    groups = None
    if ops and dev.type == "cpu":  # each group's share of our step's time, and the FLOP rate it reaches there
        shares = op_shares(lambda: step("ours"), max(steps, 3))
        group_gflop = {g: sum(n for op, n in by_op.items() if FLOP_GROUPS.get(op) == g) / 1e9 for g in shares}
        groups = {g: {"share_of_time": v, "gflop_per_s": (group_gflop[g] / (v * med["ours"])) if group_gflop[g] else None}
                  for g, v in shares.items()}
    return {"rows": rows, "cache_seconds": cache_s, "unet_gflop_per_step": gflop, "matmul_peak_gflops": peak,
            "op_groups": groups, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "unet_params_m": sum(p.numel() for p in unet.parameters()) / 1e6, "threads": torch.get_num_threads()}


#################################################################################
#                                     Main                                      #
#################################################################################

def main() -> None:
    """Run each profile in a subprocess, print a table and write bench/results/finetune.json."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profiles", nargs="+", default=["tiny", "sd15"], choices=list(PROFILES))
    p.add_argument("--rounds", type=int, default=0, help="alternating rounds (0: the profile's default)")
    p.add_argument("--steps", type=int, default=0, help="timed steps per variant and round (0: the profile's default)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    p.add_argument("--base", help="profile `base`: a diffusers text-to-image folder or hub id (e.g. SD-1.5)")
    p.add_argument("--base-batch", type=int, default=1, help="profile `base`: images per step")
    p.add_argument("--base-resolution", type=int, default=256, help="profile `base`: image side in pixels")
    p.add_argument("--ops", action="store_true", help="also print where our step's CPU time goes, by operator group")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "finetune.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if "base" in args.profiles and not args.base:
        p.error("profile base needs --base <diffusers folder or hub id>")
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        print("RESULT " + json.dumps(run_profile(args.worker, args.rounds, args.steps, args.device, args.base,
                                                 args.base_batch, args.base_resolution, args.ops)))
        return
    out = Path(args.out)
    # a run of some profiles keeps the other profiles' figures of the last run
    old = json.loads(out.read_text()) if out.is_file() else {}
    rows = [r for r in old.get("rows", []) if r["profile"] not in args.profiles]
    profile_notes = {k: v for k, v in old.get("profile_notes", {}).items() if k not in args.profiles}
    for prof in args.profiles:
        extra = (["--base", args.base, "--base-batch", str(args.base_batch), "--base-resolution",
                  str(args.base_resolution)] if prof == "base" else []) + (["--ops"] if args.ops else [])
        r = subprocess.run([sys.executable, __file__, "--worker", prof, "--rounds", str(args.rounds),
                            "--steps", str(args.steps), "--device", args.device, *extra],
                           stdout=subprocess.PIPE, text=True)
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        if r.returncode != 0 or not line:
            sys.exit(f"profile {prof} failed (exit {r.returncode})")
        res = json.loads(line[0][7:])
        rows += res["rows"]
        profile_notes[prof] = (f"{prof}: U-Net {res['unet_params_m']:.1f} M parameters, {res['threads']} threads, "
                               f"measured {time.strftime('%Y-%m-%d %H:%M')}; one-off cache of latents and text "
                               f"embeddings {res['cache_seconds']:.2f} s; process peak RSS {res['peak_rss_mb']:.0f} MB; "
                               f"U-Net forward + backward {res['unet_gflop_per_step']:.1f} GFLOP a step; fp32 "
                               f"matmul peak measured in the same process {res['matmul_peak_gflops']:.0f} GFLOP/s")
        if res["op_groups"]:
            profile_notes[prof] += "; ours by operator group (share of the step's own CPU time, GFLOP/s there): " + \
                ", ".join(f"{g} {100 * v['share_of_time']:.0f}%" + (f" at {v['gflop_per_s']:.0f}" if v["gflop_per_s"] else "")
                          for g, v in res["op_groups"].items())
    order = list(PROFILES)
    rows.sort(key=lambda r: (order.index(r["profile"]), VARIANTS.index(r["variant"])))
    print(f"{'profile':8} {'variant':9} {'batch':>5} {'px':>4} {'s/step':>8} {'img/s':>8} {'speed-up':>8} "
          f"{'U-Net GFLOP/s':>13} {'of peak':>7}")
    for r in rows:
        print(f"{r['profile']:8} {r['variant']:9} {r['batch']:5d} {r['resolution']:4d} {r['s_per_step']:8.3f} "
              f"{r['images_per_s']:8.2f} {r['speedup']:7.2f}x {r.get('unet_gflop_per_s', 0):13.1f} "
              f"{100 * r.get('share_of_matmul_peak', 0):6.0f}%")
    notes = [profile_notes[k] for k in order if k in profile_notes]
    print("\n".join(notes))
    notes += ["straight = the diffusers instruct_pix2pix example's step (VAE encode x2, text encode, dropout, "
              "U-Net fwd+bwd, default Adam); cached = latents and text embeddings cached once; "
              "ours = cached + fused Adam (mvc's default train step). Median step time over alternating rounds, "
              "fp32, SDPA attention. Target: ours >= 1.25x straight on both profiles. U-Net GFLOP/s: the U-Net's "
              "forward + backward FLOPs (torch's flop counter) per second of the whole step; of peak: against an "
              "fp32 matmul on the same device, measured in the same process.",
              f"machine: {platform.machine()}, Python {platform.python_version()}"]
    from mvc.core.utils import atomic_write_json

    atomic_write_json(out, {"title": "Fine-tuning: our train step vs the straightforward InstructPix2Pix step",
                            "rows": rows, "notes": notes, "profile_notes": profile_notes})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
