"""The GPU levers of fine-tuning and generation, measured side by side in one run (issue 26).

    python bench/bench_gpu.py [--budget-s 120] [--compile] [--out bench/results/gpu.json]   # CUDA: SD-1.5 width
    python bench/bench_gpu.py --quick                                                       # CPU: miniature, seconds

What it measures and how: docs/benchmarks.md (`bench_gpu.py`).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mvc.core import perf  # noqa: E402


@dataclass(frozen=True)
class Scale:
    """The sizes of a bench run."""
    resolution: int = 256
    batch: int = 50
    steps: int = 10        # timed fine-tuning steps per variant
    warmup: int = 3        # untimed ones before
    agree_steps: int = 50  # steps of the agreement curves
    gen_batches: tuple = (16, 32, 64, 128)
    gen_passes: int = 6    # timed U-Net passes per generation variant
    gen_steps: int = 50    # denoising steps per image (generation's throughput and agreement images)
    images: int = 200      # distinct images / prompts in the caches
    matmul: int = 8192


QUICK = Scale(resolution=64, batch=2, steps=1, warmup=1, agree_steps=3, gen_batches=(1, 2), gen_passes=1,
              gen_steps=2, images=8, matmul=256)


@dataclass(frozen=True)
class Train:
    """One fine-tuning variant."""
    precision: str = "fp16"
    checkpointing: bool = True
    sync: bool = True
    ema_foreach: bool = False
    channels_last: bool = False
    tf32: bool = False
    compile: bool = False


BASELINE = Train()
ALL = Train(precision="bf16", checkpointing=False, sync=False, ema_foreach=True, channels_last=True, tf32=True)
ONE_AT_A_TIME = {"bf16 (no GradScaler)": dict(precision="bf16"), "no checkpointing": dict(checkpointing=False),
                 "no per-step sync": dict(sync=False), "foreach EMA": dict(ema_foreach=True),
                 "channels-last": dict(channels_last=True), "TF32": dict(tf32=True)}


class Budget:
    """Wall-clock budget of the run: parts that start after it is spent are skipped (and listed)."""

    def __init__(self, seconds: float):
        self.end, self.skipped = time.perf_counter() + seconds, []

    def allows(self, name: str) -> bool:
        if time.perf_counter() < self.end:
            return True
        self.skipped.append(name)
        return False


#################################################################################
#                                  Components                                   #
#################################################################################

def unet_config(quick: bool) -> dict:
    """SD-1.5's U-Net config with the 8-channel conv_in (the miniature stand-in's widths with --quick)."""
    from mvc.diffusion.models import SD15_UNET_CONFIG
    from mvc.diffusion.standins import SD15_MINI_UNET

    return {**SD15_UNET_CONFIG, **(SD15_MINI_UNET if quick else {}), "in_channels": 8}


def build_unet(config: dict, device: torch.device):
    """The U-Net, its weights made directly on `device` (fp32)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with device:
        return UNet2DConditionModel(**config)


def fake_caches(scale: Scale, text_dim: int, latent_channels: int = 4):
    """Latent and text caches of random values in CPU memory, as train_mvc.py holds them (fp32 latents, text in
    the compute dtype: fp16 here, converted per variant)."""
    from mvc.diffusion.finetune import LatentCache, TextCache

    g = torch.Generator().manual_seed(0)
    h = scale.resolution // 8
    mean = torch.randn(scale.images, 1, latent_channels, h, h, generator=g)
    std = 0.1 * torch.rand(scale.images, 1, latent_channels, h, h, generator=g)
    table = torch.randn(scale.images, 77, text_dim, generator=g)
    return LatentCache(mean, std, 0.18215), TextCache(table, torch.arange(scale.images), torch.zeros(77, text_dim))


def sig(x: float) -> float:
    """`x` to 4 significant digits (a table figure)."""
    return float(f"{x:.4g}")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cleanup(device: torch.device) -> None:
    """Free what a variant left (and compiled graphs)."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


#################################################################################
#                              (b) fine-tuning step                             #
#################################################################################

def run_train(unet, state0: dict, caches, sched, spec: Train, scale: Scale, device: torch.device,
              total: int, timed: int) -> dict:
    """`total` steps of `spec` from the weights `state0` and seeded batches; the last `timed` are timed.
    Returns the per-step losses, the seconds of the timed steps and the peak memory."""
    from mvc.core.config import FinetuneConfig
    from mvc.diffusion.finetune import draw_step_noise, gather_batch, ip2p_loss
    from mvc.diffusion.finetune_setup import build_adam, build_ema

    latents, text = caches
    with torch.no_grad():
        for k, p in unet.state_dict().items():
            p.copy_(state0[k])
    unet.train()
    unet.enable_gradient_checkpointing() if spec.checkpointing else unet.disable_gradient_checkpointing()
    perf.channels_last(unet, spec.channels_last)
    perf.set_tf32(spec.tf32, device)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = build_adam(params, FinetuneConfig())  # the loop's: fused Adam, lr 1e-4
    ema = build_ema(params, 0.9999, spec.ema_foreach)
    dtype = torch.float16 if spec.precision == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=spec.precision == "fp16")
    fwd = perf.compiled(unet, spec.compile)
    text = type(text)(text.table.to(dtype), text.index, text.empty.to(dtype))  # the cache in the compute dtype
    gen, losses, t0 = torch.Generator().manual_seed(1), [], None
    perf.reset_peak_memory(device)
    for i in range(total):
        if i == total - timed:
            sync(device)
            t0 = time.perf_counter()
        idx = torch.randint(0, scale.images, (2, scale.batch), generator=gen)
        rnd = draw_step_noise(scale.batch, tuple(latents.mean.shape[2:]), 1000, False, 0.05, 0.05, 0.05, gen)
        batch = {k: v.to(device, non_blocking=True) for k, v in gather_batch(latents, text, *idx, idx[1], rnd).items()}
        rnd = rnd.to(device)
        with torch.autocast(device.type, dtype=dtype):
            loss = ip2p_loss(fwd, sched, **batch, noise=rnd.noise, timesteps=rnd.timesteps).mean()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        ema.step(params)
        if spec.sync:  # what the loop did before: read the loss and the norm every step
            losses.append(loss.item())
            float(norm)
        else:
            losses.append(loss.detach())
    sync(device)
    seconds = time.perf_counter() - t0
    losses = [float(x) for x in losses]
    del opt, ema, scaler, fwd
    cleanup(device)
    return {"losses": losses, "seconds": seconds, "peak_memory_gb": perf.peak_memory_gb(device)}


def train_row(name: str, spec: Train, res: dict, scale: Scale, flops: dict, peak: float | None, base: dict | None):
    """A table row of a fine-tuning variant."""
    steps = scale.steps
    ips = scale.batch * steps / res["seconds"]
    model_tflops = flops[False] * steps / res["seconds"] / 1e12  # useful work: forward + backward
    hw_tflops = flops[spec.checkpointing] * steps / res["seconds"] / 1e12  # + recomputed forward
    return {"part": "train", "variant": name, **asdict(spec), "images_per_s": round(ips, 2),
            "s_per_step": round(res["seconds"] / steps, 4), "tflops": sig(model_tflops),
            "hw_tflops": sig(hw_tflops), "share_of_peak": sig(model_tflops / peak) if peak else None,
            "speedup": round(ips / base["images_per_s"], 3) if base else 1.0, "peak_memory_gb": res["peak_memory_gb"]}


def train_variants(scale: Scale, group: str) -> list[tuple[str, Train, int]]:
    """(name, variant, steps run) of a group: 'first' the baseline and all levers over the agreement steps;
    'more' all levers with fp16 kept (agreement too), then each lever alone; 'compile' all levers + compile."""
    if group == "compile":
        return [("all levers + compile", replace(ALL, compile=True), scale.warmup + scale.steps)]
    if group == "first":
        return [("baseline", BASELINE, scale.agree_steps), ("all levers", ALL, scale.agree_steps)]
    out = [("all levers, fp16 kept", replace(ALL, precision="fp16"), scale.agree_steps)]
    return out + [(f"+ {k}", replace(BASELINE, **v), scale.warmup + scale.steps) for k, v in ONE_AT_A_TIME.items()]


def bench_train(unet, state0: dict, caches, sched, scale: Scale, device, flops: dict, peak, budget: Budget,
                variants: list, base: dict | None = None) -> tuple[list, dict]:
    """(b), with the agreement curves of (d): rows, and the loss curves by variant name."""
    rows, curves = [], {}
    for name, spec, total in variants:
        if not budget.allows(f"train: {name}"):
            continue
        print(f"train: {name} ...", file=sys.stderr, flush=True)
        try:
            res = run_train(unet, state0, caches, sched, spec, scale, device, max(total, scale.steps), scale.steps)
        except Exception as e:  # one variant failing (out of memory, a missing kernel) keeps the others
            rows.append({"part": "train", "variant": name, **asdict(spec), "error": f"{type(e).__name__}: {e}"[:300]})
            cleanup(device)
            continue
        row = train_row(name, spec, res, scale, flops, peak, base)
        base = base or row
        rows.append(row)
        curves[name] = res["losses"]
    return rows, curves


def bench_lora(unet, caches, sched, scale: Scale, device, flops: dict, peak, budget: Budget, base: dict | None,
               rank: int = 8) -> list:
    """Full fine-tuning's peak memory against LoRA's: the all-levers step on a copy of the U-Net with rank-`rank`
    adapters on the attention projections and conv_in trained (train.lora_rank's set-up). Its TFLOP/s count the
    full backward, an upper bound (frozen weights get no weight gradient)."""
    name = f"LoRA r{rank}, all levers"
    if not budget.allows(f"train: {name}"):
        return []
    from mvc.diffusion.finetune_setup import LORA_TARGETS, add_lora

    print(f"train: {name} ...", file=sys.stderr, flush=True)
    lora = None
    try:
        lora = copy.deepcopy(unet)
        add_lora(lora, rank, LORA_TARGETS)
        lora.conv_in.requires_grad_(True)
        state = {k: v.detach().clone() for k, v in lora.state_dict().items()}
        res = run_train(lora, state, caches, sched, ALL, scale, device, scale.warmup + scale.steps, scale.steps)
    except Exception as e:
        return [{"part": "train", "variant": name, **asdict(ALL), "error": f"{type(e).__name__}: {e}"[:300]}]
    finally:
        del lora
        cleanup(device)
    return [{**train_row(name, ALL, res, scale, flops, peak, base), "lora_rank": rank}]


def curve_agreement(curves: dict, a: str, b: str, steps: int) -> dict | None:
    """Max and mean relative difference of two loss curves over their first `steps` steps."""
    if a not in curves or b not in curves:
        return None
    x, y = np.asarray(curves[a][:steps]), np.asarray(curves[b][:steps])
    rel = np.abs(x - y) / np.maximum(np.abs(x), 1e-12)
    return {"steps": len(x), "max_rel_diff": float(rel.max()), "mean_rel_diff": float(rel.mean()),
            "first_loss": [float(x[0]), float(y[0])], "last_loss": [float(x[-1]), float(y[-1])]}


#################################################################################
#                           (c) generation U-Net passes                         #
#################################################################################

def bench_generation(unet, scale: Scale, device, flops_per_row: int, peak, budget: Budget, compile_: bool) -> list:
    """U-Net passes of MVC generation (3 rows per image) in fp16, per lever and batch size."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32  # the pipeline's dtype (mvc.core.distributed)
    g16 = copy.deepcopy(unet).to(dtype).eval()
    h, d = scale.resolution // 8, g16.config.cross_attention_dim
    levers = [("fp16 + channels-last + compile", True, True)] if compile_ else [("fp16", False, False),
                                                                                ("fp16 + channels-last", True, False)]
    rows = []
    for name, cl, comp in levers:
        perf.channels_last(g16, cl)
        fwd = perf.compiled(g16, comp)
        for bs in scale.gen_batches if not comp else scale.gen_batches[-2:-1]:  # compiled: one shape
            if not budget.allows(f"generate: {name}, batch {bs}"):
                continue
            print(f"generate: {name}, batch {bs} ...", file=sys.stderr, flush=True)
            x = torch.randn(3 * bs, 8, h, h, device=device, dtype=dtype)
            emb = torch.randn(3 * bs, 77, d, device=device, dtype=dtype)
            t = torch.tensor(500.0, device=device)
            try:
                perf.reset_peak_memory(device)
                with torch.no_grad():
                    times = perf.timed(lambda: fwd(x, t, encoder_hidden_states=emb, return_dict=False), device,
                                       scale.gen_passes, warmup=2)
            except Exception as e:
                rows.append({"part": "generate", "variant": name, "batch": bs, "error": f"{type(e).__name__}: {e}"[:300]})
                cleanup(device)
                continue
            s = statistics.median(times)
            tflops = flops_per_row * 3 * bs / s / 1e12
            rows.append({"part": "generate", "variant": name, "batch": bs, "s_per_pass": round(s, 5),
                         "images_per_s": sig(bs / (s * scale.gen_steps)), "tflops": sig(tflops),
                         "share_of_peak": sig(tflops / peak) if peak else None,
                         "peak_memory_gb": perf.peak_memory_gb(device)})
    del g16
    cleanup(device)
    return rows


#################################################################################
#                 (d) images from the same seeds, slow and fast                 #
#################################################################################

def build_pipeline(unet, quick: bool, device: torch.device):
    """An IP2P pipeline of `unet` (a copy in the generation dtype) with a VAE and text encoder of the same
    width (SD-1.5's, or the miniature stand-in's), built on `device`."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    from mvc.diffusion.models import SD15_TEXT_CONFIG, SD15_VAE_CONFIG, ip2p_pipeline
    from mvc.diffusion.standins import SD15_MINI_TEXT, SD15_MINI_VAE, SD15_SCHEDULER_CONFIG
    from mvc.diffusion.tokenizer import build_tiny_tokenizer

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    tok = build_tiny_tokenizer(max_length=77)
    torch.manual_seed(0)
    with device:
        vae = AutoencoderKL(**{**SD15_VAE_CONFIG, **(SD15_MINI_VAE if quick else {})})
        te = CLIPTextModel(CLIPTextConfig(**{**SD15_TEXT_CONFIG, **(SD15_MINI_TEXT if quick else {}),
                                             "vocab_size": len(tok)}, bos_token_id=tok.bos_token_id,
                                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    comps = {"vae": vae.to(dtype).eval(), "text_encoder": te.to(dtype).eval(), "tokenizer": tok,
             "scheduler": DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)}
    return ip2p_pipeline(comps, copy.deepcopy(unet).to(dtype).eval())


def image_agreement(pipe, scale: Scale, device, n: int = 4) -> dict:
    """n images from the same seeds: batches of 2, contiguous (slow) vs one batch, channels-last (fast)."""
    from mvc.diffusion.sd_io import encode_prompts
    from mvc.generation.generators import render

    h = scale.resolution // 8
    g = torch.Generator().manual_seed(0)
    emb = encode_prompts(pipe.tokenizer, pipe.text_encoder, [f"a photo of class type thing {i}" for i in range(n)])
    neg = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""]).expand(n, -1, -1)
    cond = torch.randn(n, 4, h, h, generator=g).to(device, pipe.unet.dtype)
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(n)]  # noqa: E731
    kw = dict(num_inference_steps=scale.gen_steps, guidance_scale=7.5, image_guidance_scale=1.5)
    perf.channels_last(pipe.unet, False)
    slow, gs = [], gens()
    for i in range(0, n, 2):
        slow += render(pipe, emb[i:i + 2], neg[i:i + 2], cond[i:i + 2], gs[i:i + 2], **kw)
    perf.channels_last(pipe.unet, True)
    fast = render(pipe, emb, neg, cond, gens(), **kw)
    a = np.stack([np.asarray(im, np.float32) for im in slow])
    b = np.stack([np.asarray(im, np.float32) for im in fast])
    return {"images": n, "mean_abs_pixel_diff": float(np.abs(a - b).mean()), "max_abs_pixel_diff": float(np.abs(a - b).max()),
            "pixel_std": float(a.std()), "note": "0-255 scale; slow = batches of 2, contiguous; fast = one batch, "
                                                "channels-last"}


def auto_batch(pipe, scale: Scale, device) -> dict:
    """The batch size generate.batch_size=null picks for this pipeline on `device` (CUDA only)."""
    from mvc.generation.generate import batch_from_memory, image_memory_bytes

    if device.type != "cuda":
        return {"auto_batch_size": None, "note": "sized from free memory on CUDA only"}
    per = image_memory_bytes(pipe, scale.resolution)
    free = perf.free_memory_bytes(device)
    return {"auto_batch_size": batch_from_memory(per, free), "per_image_gb": round(per / 1e9, 3),
            "free_gb": round(free / 1e9, 2)}


#################################################################################
#                                     Main                                      #
#################################################################################

def measure_peak(scale: Scale, device, out: dict) -> float | None:
    """(a): the matmul peak (bf16 on CUDA, fp32 on the CPU), recorded in `out`."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        peak = perf.matmul_tflops(device, scale.matmul, dtype, repeats=20 if device.type == "cuda" else 3)
    except Exception as e:
        out["errors"]["matmul_peak"] = f"{type(e).__name__}: {e}"[:300]
        return None
    out["matmul_peak"] = {"tflops": sig(peak), "n": scale.matmul, "dtype": str(dtype).split(".")[-1]}
    return peak


def pipeline_parts(unet, quick: bool, scale: Scale, device, budget: Budget, out: dict) -> None:
    """(d)'s images and the batch size generate.batch_size=null picks, from one pipeline (each part fails softly)."""
    pipe = None
    for name in ("images", "auto_batch"):
        if not budget.allows(name):
            continue
        try:
            pipe = pipe or build_pipeline(unet, quick, device)
            if name == "images":
                out["agreement"]["images"] = image_agreement(pipe, scale, device)
            else:
                out["generate_auto_batch"] = auto_batch(pipe, scale, device)
        except Exception as e:
            out["errors"][name] = f"{type(e).__name__}: {e}"[:300]
    del pipe
    cleanup(device)


def run(quick: bool, budget_s: float, compile_: bool, device: torch.device) -> dict:
    """Every part in order, each failing softly; the JSON-ready results."""
    from diffusers import DDPMScheduler

    from mvc.diffusion.standins import SD15_SCHEDULER_CONFIG

    scale = QUICK if quick else Scale()
    budget, t0 = Budget(budget_s), time.perf_counter()
    out: dict = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                 "torch": torch.__version__, "quick": quick, "scale": asdict(scale), "errors": {}, "agreement": {}}
    peak = measure_peak(scale, device, out)
    config, h = unet_config(quick), scale.resolution // 8
    flops = {c: perf.unet_flops(config, scale.batch, h, 77, train=True, checkpointing=c) for c in (False, True)}
    row_flops = perf.unet_flops(config, 1, h, 77)
    out["flops"] = {"train_step_gflop": flops[False] / 1e9, "train_step_with_recompute_gflop": flops[True] / 1e9,
                    "unet_forward_gflop_per_row": row_flops / 1e9}
    unet, sched = build_unet(config, device), DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    state0 = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    caches = fake_caches(scale, config["cross_attention_dim"])
    # the most telling parts first, so that a short budget still measures them: baseline vs all levers,
    # generation, images; then the rest of (b) and (d); the compiled variants last
    rows, curves = bench_train(unet, state0, caches, sched, scale, device, flops, peak, budget,
                               train_variants(scale, "first"))
    base = next((r for r in rows if r.get("variant") == "baseline" and "images_per_s" in r), None)
    rows += bench_generation(unet, scale, device, row_flops, peak, budget, False)
    pipeline_parts(unet, quick, scale, device, budget, out)
    more, more_curves = bench_train(unet, state0, caches, sched, scale, device, flops, peak, budget,
                                    train_variants(scale, "more"), base)
    rows, curves = rows + more, {**curves, **more_curves}
    rows += bench_lora(unet, caches, sched, scale, device, flops, peak, budget, base)
    out["agreement"].update(train_fp16_kept=curve_agreement(curves, "baseline", "all levers, fp16 kept", scale.agree_steps),
                            train_bf16=curve_agreement(curves, "baseline", "all levers", scale.agree_steps))
    if compile_:  # (e) last
        rows += bench_train(unet, state0, caches, sched, scale, device, flops, peak, budget,
                            train_variants(scale, "compile"), base)[0]
        rows += bench_generation(unet, scale, device, row_flops, peak, budget, True)
    out.update(rows=rows, skipped=budget.skipped, seconds=round(time.perf_counter() - t0, 1))
    return out


def print_table(res: dict) -> None:
    """A short table of the rows, and the agreement."""
    print(f"matmul peak: {res.get('matmul_peak')}   device: {res['gpu'] or res['device']}")
    print(f"{'part':9} {'variant':34} {'batch':>5} {'img/s':>9} {'TFLOP/s':>8} {'share':>6} {'x base':>6} {'peak GB':>8}")
    for r in res["rows"]:
        if "error" in r:
            print(f"{r['part']:9} {r['variant']:34} error: {r['error'][:60]}")
            continue
        fmt = lambda v, f: format(v, f) if isinstance(v, (int, float)) else "-"  # noqa: E731
        print(f"{r['part']:9} {r['variant']:34} {fmt(r.get('batch'), '5d')} {fmt(r['images_per_s'], '9.2f')} "
              f"{fmt(r['tflops'], '8.1f')} {fmt(r.get('share_of_peak'), '6.2f')} {fmt(r.get('speedup'), '6.2f')} "
              f"{fmt(r.get('peak_memory_gb'), '8.1f')}")
    print("agreement:", json.dumps(res.get("agreement")))
    if res["skipped"]:
        print("skipped (budget):", ", ".join(res["skipped"]))


def main(argv=None) -> dict:
    """Parse the flags, run, print, write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU, miniature width and sizes: a test of this script")
    ap.add_argument("--compile", action="store_true", help="also the torch.compile variants (last; minutes)")
    ap.add_argument("--budget-s", type=float, default=150.0, help="parts starting after this many seconds are skipped")
    ap.add_argument("--device", default="auto", help="cuda, cuda:1, cpu (auto: cuda when present, cpu with --quick)")
    ap.add_argument("--out", default=None, help="JSON file (default: bench/results/gpu.json on CUDA, none with "
                    "--quick, so that bench/RESULTS.md keeps CUDA figures only)")
    args = ap.parse_args(argv)
    dev = args.device
    if dev == "auto":
        dev = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    if torch.device(dev).type != "cuda" and not args.quick:
        ap.error("SD-1.5's width needs CUDA; --quick runs the miniature on the CPU")
    res = run(args.quick, args.budget_s, args.compile, torch.device(dev))
    res.update(title="GPU levers: fine-tuning and generation at SD-1.5's width (bench_gpu.py)",
               notes=[f"{res['gpu']}, torch {res['torch']}; matmul peak {res.get('matmul_peak')}; agreement "
                      f"{json.dumps(res['agreement'])}; skipped: {res['skipped'] or 'none'}"])
    print_table(res)
    print(json.dumps(res, default=str))
    out = args.out or (None if args.quick else str(ROOT / "bench" / "results" / "gpu.json"))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=1, default=str) + "\n")
    return res


if __name__ == "__main__":
    main()
