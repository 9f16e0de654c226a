"""How much class can the tiny base's VAE keep? Train VAE variants alone and judge their round trips.

    .venv/bin/python scripts/probe_vae.py --config configs/tiny.yaml --variant 16,32,32:500 --variant 32,64:1500

Each variant (`widths:steps`, widths as `tiny.vae_channels`) trains the tiny VAE on the remainder pool, then
round-trips the evaluation's real test subset, judged by the evaluation-only reference (label fidelity, overall
and per class): what a VAE setting can at best give, before a profile pays for the whole base. Writes
<run.output_dir>/probe_vae/{probe_vae.md, probe_vae.json}. docs/scripts.md has more.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from mvc.core.config import build_parser, parse_args
from mvc.core.utils import MVCError, run_cli

log = logging.getLogger(__name__)


def parse_variant(text: str) -> tuple[list[int], int]:
    """'16,32,32:1500' -> ([16, 32, 32], 1500)."""
    try:
        widths, steps = text.split(":")
        out = [int(w) for w in widths.split(",")], int(steps)
    except ValueError:
        raise MVCError(f"--variant {text!r}: expected widths:steps, e.g. 16,32,32:1500") from None
    if min(out[0]) < 1 or out[1] < 1:
        raise MVCError(f"--variant {text!r}: widths and steps must be positive")
    return out


def cli(argv: list[str] | None = None) -> list[dict]:
    parser = build_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--variant", action="append", required=True, help="widths:steps, e.g. 32,64:1500 (repeat)")
    cfg, args = parse_args(parser, argv)
    variants = [parse_variant(v) for v in args.variant]

    import numpy as np
    import torch

    from mvc.core.config import _check_widths
    from mvc.core.paths import RunPaths
    from mvc.core.stage import start_stage
    from mvc.core.utils import atomic_write_json, atomic_write_text
    from mvc.data import load_splits
    from mvc.diffusion.sd_io import images_to_uint8
    from mvc.diffusion.tiny import build_tiny_components, pool_images, pretrain_vae
    from mvc.evaluation.evaluate import load_reference, measure, real_subset
    from mvc.studies.diagnose import in_memory, vae_round_trip

    tinies = []
    for widths, steps in variants:
        t = dataclasses.replace(cfg.tiny, vae_channels=widths, vae_steps=steps)
        _check_widths(t)  # refused before any work
        tinies.append(t)
    out = RunPaths.of(cfg).root / "probe_vae"
    stage = start_stage(cfg, "probe_vae")
    labelled, pool, test = load_splits(cfg.data)
    real = real_subset(cfg, test)
    ref = load_reference(cfg, stage.accelerator)
    size = cfg.tiny.image_size
    images = pool_images(pool, size)  # (N, 3, S, S) uint8: the tiny base's pretraining images
    real_r = images_to_uint8([real.load_image(i) for i in range(len(real))], size)
    none = np.full(len(real), -1)
    rows = []
    for t in tinies:
        torch.manual_seed(0)
        vae = build_tiny_components(t)["vae"]
        t0 = time.time()
        mse = pretrain_vae(vae, images, t)
        seconds = time.time() - t0
        m = measure(ref, in_memory(vae_round_trip(vae, real_r), real, "vae"), none, labelled, real, cfg.evaluate)
        rows.append({"vae_channels": t.vae_channels, "latent": size // 2 ** (len(t.vae_channels) - 1),
                     "steps": t.vae_steps, "kl_weight": t.vae_kl_weight, "mse": mse,
                     "fidelity": m["fidelity"]["overall"], "per_class": m["fidelity"]["per_class"], "fd": m["frechet"]["synthetic_vs_test"],
                     "seconds": round(seconds, 1)})
        log.info("probe_vae: %s", rows[-1])
    classes = list(labelled.classes)
    lines = [f"# VAE probe ({len(pool)} pool images, {len(real)} real test images at {size} px)", "",
             "| VAE widths | latents | steps | MSE | round-trip fidelity | " + " | ".join(classes) + " | FD-ref | train s |",
             "|---" * (7 + len(classes)) + "|"]
    for r in rows:
        per = " | ".join(f"{100 * f:.0f}" for f in r["per_class"])
        lines.append(f"| {'-'.join(map(str, r['vae_channels']))} | {r['latent']}x{r['latent']}x{cfg.tiny.latent_channels}"
                     f" | {r['steps']} | {r['mse']:.4f} | {100 * r['fidelity']:.1f}% | {per} | {r['fd']:.2f} | "
                     f"{r['seconds']:.0f} |")
    if stage.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "probe_vae.json", {"rows": rows, "tiny": dataclasses.asdict(cfg.tiny)})
        atomic_write_text(out / "probe_vae.md", "\n".join(lines) + "\n")
        print("\n".join(lines))
    return rows


if __name__ == "__main__":
    run_cli(cli)
