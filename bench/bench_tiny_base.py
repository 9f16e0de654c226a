"""Tiny base pretraining throughput (images/s) of the VAE and the text-to-image U-Net, per recipe.

    .venv/bin/python bench/bench_tiny_base.py [--config configs/tiny.yaml] [--steps 30]
    .venv/bin/python bench/bench_tiny_base.py --variant '{"vae_channels": [32, 64]}'
    python bench/bench_tiny_base.py --config configs/gpu.yaml --device cuda     # on a GPU

Rows: the config's `tiny` recipe, then each `--variant` (a JSON object of `tiny.*` overrides; default: the
first recipe, without min-SNR weighting and EMA), measured side by side in one process on the same pool images (real Fashion-MNIST training images when the data
is found, else random pixels), each for `--steps` optimizer steps after 3 warm-up steps. Ratios are
against the first row. Writes bench/results/tiny_base.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mvc.core.utils import atomic_write_json  # noqa: E402

# The recipe before docs/generator.md's changes that cost time per step (pool size and step counts do not).
FIRST_RECIPE = '{"snr_gamma": null, "ema_decay": null}'


def _time(fn, steps: int, device: str) -> float:
    """Seconds per step of `fn(steps)` after a 3-step warm-up (the device's queue drained before each clock)."""
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn(3)
    sync()
    t0 = time.perf_counter()
    fn(steps)
    sync()
    return (time.perf_counter() - t0) / steps


def measure(tiny_cfg, images, ids, null_ids, steps: int, device: str = "cpu", precision: str = "no") -> dict:
    """Seconds per step and images/s of VAE and U-Net pretraining for one recipe."""
    import torch

    from mvc.diffusion.tiny import build_tiny_components, encode_latents, pretrain_unet, pretrain_vae

    torch.manual_seed(0)
    comps = build_tiny_components(tiny_cfg)
    vae, unet, te, sched = comps["vae"], comps["unet"], comps["text_encoder"], comps["scheduler"]

    def vae_steps(n):
        c = copy.deepcopy(tiny_cfg)
        c.vae_steps = n
        vae.requires_grad_(True)
        pretrain_vae(vae, images, c, device, progress=False, precision=precision)

    latents = encode_latents(vae.to(device), images[:512], device=device)

    def unet_steps(n):
        c = copy.deepcopy(tiny_cfg)
        c.unet_steps = n
        unet.requires_grad_(True)
        pretrain_unet(unet, te, sched, latents, ids[:512], null_ids, c, device, progress=False, precision=precision)

    s_vae, s_unet = _time(vae_steps, steps, device), _time(unet_steps, steps, device)
    b = tiny_cfg.batch_size
    return {"latent": "x".join(map(str, latents.shape[1:])),
            "vae_params_M": round(sum(p.numel() for p in vae.parameters()) / 1e6, 3),
            "unet_params_M": round(sum(p.numel() for p in unet.parameters()) / 1e6, 3),
            "vae_img_per_s": round(b / s_vae, 1), "unet_img_per_s": round(b / s_unet, 1),
            "vae_s_per_step": round(s_vae, 4), "unet_s_per_step": round(s_unet, 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--variant", action="append", default=[], help="JSON object of tiny.* overrides (default: the "
                   "first recipe, without min-SNR weighting and EMA, for the before/after figure)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "tiny_base.json"))
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", default="no", choices=["no", "fp16", "bf16"], help="mixed precision of the steps")
    args = p.parse_args()

    import torch

    from mvc.core.config import load_yaml, make_config
    from mvc.diffusion.sd_io import tokenize
    from mvc.diffusion.tiny import build_tiny_components, pool_images

    cfg = make_config(load_yaml(args.config))
    try:
        from mvc.data import load_splits

        _, pool, _ = load_splits(cfg.data)
        images = pool_images(pool.subset(range(1024)), cfg.tiny.image_size, progress=False)
        source = "Fashion-MNIST pool"
    except Exception as e:  # no data here: random pixels time the same
        images = torch.randint(0, 256, (1024, 3, cfg.tiny.image_size, cfg.tiny.image_size), dtype=torch.uint8)
        source = f"random pixels ({type(e).__name__})"
    tok = build_tiny_components(cfg.tiny)["tokenizer"]
    ids = tokenize(tok, ["dark small round, a photo"] * len(images))[0]
    null_ids = tokenize(tok, [""])[0][0]

    recipes = [("config", cfg.tiny)]
    for v in args.variant or [FIRST_RECIPE]:
        c = copy.deepcopy(cfg.tiny)
        for k, val in json.loads(v).items():
            if not hasattr(c, k):
                raise SystemExit(f"error: unknown tiny key {k!r}")
            setattr(c, k, val)
        recipes.append((v, c))
    rows = []
    for name, c in recipes:
        r = {"recipe": name, **measure(c, images, ids, null_ids, args.steps, args.device, args.precision)}
        base = rows[0] if rows else r
        r["vae_speed_ratio"] = round(r["vae_img_per_s"] / base["vae_img_per_s"], 2)
        r["unet_speed_ratio"] = round(r["unet_img_per_s"] / base["unet_img_per_s"], 2)
        rows.append(r)
        print(json.dumps(r), flush=True)
    atomic_write_json(args.out, {"title": "Tiny base pretraining throughput (images/s)", "rows": rows,
                                 "notes": [f"device {args.device}, precision {args.precision}; "
                                           f"{torch.get_num_threads()} torch threads; batch {cfg.tiny.batch_size}; "
                                           f"{args.steps} steps per row after 3 warm-up steps; images: {source}"]})


if __name__ == "__main__":
    main()
