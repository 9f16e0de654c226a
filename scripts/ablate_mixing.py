"""Ablation of the mixing strength: coarse k (tokens shuffled/swapped) at both stages, and fine s (slice size).

    .venv/bin/python scripts/ablate_mixing.py --config configs/tiny.yaml --k 1 2 4 --s 1 2 4 8

For each setting (the unmixed baseline; coarse with each k, once on the prompt's token ids
before the text encoder ('tokens', the default) and once on its output embedding ('embeds',
the literal reading of the paper, where a shuffle is invisible to the U-Net's cross-attention:
see docs/architecture.md, "Coarse mixing: where the shuffle happens"); fine with each s; the
rest of the mixing section as configured), V variants of a few sources per class are generated with the
fine-tuned model (generate.model_dir, default <run.output_dir>/mvc/final) and scored:
- diversity: mean pairwise L2 distance between variants of the same source;
- fidelity: mean L2 distance from each variant to the nearest real (labelled) image of its class;
- shift: mean L2 distance from each variant to the unmixed ('none') image of the same source and
  seed, i.e. what the mixing alone changes (the diffusion noise is shared). It is 0 for a
  coarse shuffle at the 'embeds' stage.
Distances are measured in the model's own VAE latent space (the fixed, offline encoder the U-Net
works in, so a distance there reflects what the model changes; the paper's figures compare images,
not classifier features) and, as a check, in pixel space. Larger k/s should raise diversity and,
past some point, move images away from the real ones (the paper: s < 10 of 768 stays realistic).

Writes <out>/ablation.csv, <out>/ablation.md and <out>/ablation_grids.png (one panel per setting:
rows = sources, columns = variants). Variant v of a source uses the same seed in every setting,
so the panels differ only by the mixing.
"""

from __future__ import annotations

import csv
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mvc import seeds  # noqa: E402
from mvc.config import build_parser, parse_args  # noqa: E402
from mvc.utils import MVCError, atomic_path, atomic_write_text, batched, image_grid, run_cli  # noqa: E402


def settings(ks: list[int], ss: list[int], stages: list[str]) -> list[tuple[str, str, dict]]:
    """(name, op, param overrides) for the baseline, each coarse k at each stage and each fine s."""
    out = [("none", "none", {})]
    out += [(f"coarse k={k} {st}", "coarse", {"k": k, "coarse_stage": st}) for st in stages for k in ks]
    out += [(f"fine s={s}", "fine", {"s": s}) for s in ss]
    return out


@torch.no_grad()
def latents_of(pipe, images, res: int) -> np.ndarray:
    """Flattened VAE latents (N, C*h*w) of PIL images: the feature space of the metrics."""
    from mvc.sd_io import encode_conditions

    return encode_conditions(pipe.vae, images, res).flatten(1).float().cpu().numpy()


def pixels_of(images, res: int) -> np.ndarray:
    """Flattened pixels in [0, 1], (N, 3*res*res)."""
    return np.stack([np.asarray(im.convert("RGB").resize((res, res)), np.float32).ravel() / 255 for im in images])


def diversity(feats: np.ndarray, groups: np.ndarray) -> float:
    """Mean pairwise L2 distance within each group (variants of one source), averaged over groups."""
    vals = []
    for gid in np.unique(groups):
        f = feats[groups == gid]
        if len(f) > 1:
            d = np.linalg.norm(f[:, None] - f[None], axis=-1)
            vals.append(d[np.triu_indices(len(f), 1)].mean())
    return float(np.mean(vals)) if vals else float("nan")


def nearest_real(feats: np.ndarray, labels: np.ndarray, real: np.ndarray, real_labels: np.ndarray) -> float:
    """Mean L2 distance from each synthetic sample to the nearest real sample of its class."""
    out = []
    for f, y in zip(feats, labels):
        r = real[real_labels == y]
        out.append(np.linalg.norm(r - f, axis=1).min())
    return float(np.mean(out))


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the k x s ablation and write the table and figure."""
    parser = build_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4], help="coarse k values")
    parser.add_argument("--s", type=int, nargs="+", default=[1, 2, 4, 8], help="fine slice sizes")
    parser.add_argument("--stages", nargs="+", default=["tokens", "embeds"], choices=["tokens", "embeds"],
                        help="coarse stages to compare")
    parser.add_argument("--classes", type=int, default=3, help="first N classes")
    parser.add_argument("--sources", type=int, default=2, help="sources per class")
    parser.add_argument("--variants", type=int, default=4, help="variants per source")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: generate.num_inference_steps)")
    parser.add_argument("--out", default=None, help="output folder (default: <run.output_dir>/ablation_mixing)")
    cfg, args = parse_args(parser, argv)
    if min(args.k + args.s + [args.classes, args.sources, args.variants]) < 1:
        raise MVCError("--k, --s, --classes, --sources and --variants must be >= 1")

    from mvc.captions import load_captions
    from mvc.data import load_splits
    from mvc.generate import render, resolve_resolution
    from mvc.mixing import ClassPrompts, mix_prompts, mixing_params, parse_window
    from mvc.models import load_ip2p_pipeline
    from mvc.paths import RunPaths
    from mvc.sd_io import encode_conditions, encode_ids, encode_prompts
    from mvc.synthetic import Job

    g = cfg.generate
    paths = RunPaths.of(cfg)
    out = Path(args.out or paths.root / "ablation_mixing")
    model_dir = paths.final
    pipe = load_ip2p_pipeline(model_dir, g.scheduler)
    res = resolve_resolution(cfg, model_dir, pipe)
    steps = int(args.steps or g.num_inference_steps)
    seed = int(cfg.run.seed or 0)
    labelled = load_splits(cfg.data)[0]
    captions = load_captions(cfg, labelled)
    window = parse_window(cfg.mixing.window)
    base_params = mixing_params(cfg.mixing)
    targets = np.asarray(labelled.targets)
    classes = [c for c in range(len(labelled.classes)) if (targets == c).sum() >= 2][: args.classes]
    if not classes:
        raise MVCError("no class has 2 labelled images")
    neg = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""])
    encode = lambda ids, mask: encode_ids(pipe.text_encoder, ids, mask)  # noqa: E731

    # the real images of the chosen classes: reference set for fidelity
    real_idx = [i for i in range(len(labelled)) if targets[i] in classes]
    real_ims = [labelled.load_image(i) for i in real_idx]
    real_lat, real_pix = latents_of(pipe, real_ims, res), pixels_of(real_ims, res)
    real_y = targets[real_idx]

    ctxs, conds = {}, {}
    for c in classes:
        sources = np.flatnonzero(targets == c).tolist()
        ids = [str(labelled.ids[s]) for s in sources]
        ctxs[c] = ClassPrompts.build(sources, ids, [captions[i] for i in ids], labelled.classes[c],
                                     cfg.captions.prompt_template, window, pipe.tokenizer, encode)
        srcs = ctxs[c].sources[: args.sources]
        lat = encode_conditions(pipe.vae, [labelled.load_image(s) for s in srcs], res)
        conds.update({s: lat[i] for i, s in enumerate(srcs)})

    from tqdm.auto import tqdm

    rows, panels, unmixed = [], [], {}
    for name, op, over in tqdm(settings(args.k, args.s, args.stages), desc="settings"):
        params = {**base_params, **over}
        jobs = [Job(0, c, labelled.classes[c], "", s, labelled.ids[s], v, op)
                for c in classes for s in ctxs[c].sources[: args.sources] for v in range(args.variants)]
        images = []
        for c in classes:  # mix_batch works on the jobs of one class (its prompts, windows and donors)
            for batch in batched([j for j in jobs if j.label == c], g.batch_size):
                embeds = mix_prompts(batch, ctxs[c], params, seed, encode,
                                     pipe.tokenizer.convert_ids_to_tokens)[0]  # (B, T, D)
                images += render(pipe, embeds, neg.expand(len(batch), -1, -1),
                                 torch.stack([conds[j.source] for j in batch]),
                                 [seeds.generator(seed, "generate.image", j.source, j.variant) for j in batch],
                                 steps, g.guidance_scale, g.image_guidance_scale)
        groups = np.array([j.source for j in jobs])
        labels = np.array([j.label for j in jobs])
        lat, pix = latents_of(pipe, images, res), pixels_of(images, res)
        if op == "none":  # settings() puts the baseline first: the reference of the shift
            unmixed = {"latent": lat, "pixel": pix}
        shift = {k: float(np.linalg.norm(f - unmixed[k], axis=1).mean()) for k, f in (("latent", lat), ("pixel", pix))}
        coarse = op == "coarse"
        rows.append({"setting": name, "op": op, "k": params["k"] if coarse else "",
                     "coarse_stage": params["coarse_stage"] if coarse else "", "s": params["s"] if op == "fine" else "",
                     "images": len(images),
                     "diversity_latent": round(diversity(lat, groups), 4),
                     "nearest_real_latent": round(nearest_real(lat, labels, real_lat, real_y), 4),
                     "diversity_pixel": round(diversity(pix, groups), 4),
                     "nearest_real_pixel": round(nearest_real(pix, labels, real_pix, real_y), 4),
                     "shift_latent": round(shift["latent"], 4), "shift_pixel": round(shift["pixel"], 4)})
        # panel: rows = sources (first class first), columns = variants
        panels.append((name, image_grid([images[i:i + args.variants] for i in range(0, len(images), args.variants)])))

    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "ablation.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    head = "| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n"
    md = (f"# Mixing ablation\n\nmodel `{model_dir}`, {len(classes)} classes x {args.sources} sources x "
          f"{args.variants} variants, {steps} steps, scheduler {g.scheduler}, seed {seed}; "
          f"mixing base: {dataclasses.asdict(cfg.mixing)}\n\n"
          "diversity = mean pairwise L2 between variants of a source; nearest_real = mean L2 to the nearest "
          "real image of the class; shift = mean L2 to the unmixed image of the same source and seed "
          "(VAE latents and pixels in [0, 1]).\n\n"
          + head + "".join("| " + " | ".join(str(v) for v in r.values()) + " |\n" for r in rows))
    atomic_write_text(out / "ablation.md", md)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.2 * len(classes) * args.sources / args.variants + 0.6))
    for ax, (name, im) in zip(np.atleast_1d(axes), panels):
        ax.imshow(im)
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    with atomic_path(out / "ablation_grids.png") as tmp:
        fig.savefig(tmp, dpi=150, bbox_inches="tight")
    plt.close(fig)
    print(md)
    return rows


if __name__ == "__main__":
    run_cli(main)
