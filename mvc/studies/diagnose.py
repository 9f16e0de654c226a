"""Where does a generator lose the class? Label fidelity measured stage by stage, by the reference.

Rows, each in the evaluation-only reference's feature space: real test images at the generator's resolution,
their VAE round trip, the base's text-to-image samples, the fine-tuned model without mixing over a grid of text
/ image guidance, and each mixing op. The synthetic rows are sets in the project's format (`<out>/sets/<row>/`),
made by the same generation code as `generate_mvc.py`. Outputs: diagnose.json, .md, .png and TensorBoard.
The reference only judges: to *choose* settings, give a `selector` (a classifier trained on the labelled subset
alone); its agreement is the column to select on. docs/generator.md reads such a table.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mvc.core import seeds
from mvc.core.paths import RunPaths
from mvc.core.utils import MVCError, RunLogger, atomic_write_json, atomic_write_text, safe_name

log = logging.getLogger(__name__)


def in_memory(images: np.ndarray, like: Any, name: str) -> Any:
    """(N, H, W, 3) uint8 images as an ImageDataset with the classes and targets of `like`."""
    from mvc.data.dataset import ArraySource, ImageDataset

    return ImageDataset(name, like.split, like.classes, like.targets, [f"{name}/{i}" for i in range(len(images))],
                        ArraySource(np.ascontiguousarray(images)))


def to_hwc(x: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8 (the pipelines' postprocess rounding)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def vae_round_trip(vae: Any, images: torch.Tensor, batch_size: int = 128) -> np.ndarray:
    """Decode(encode mean) of (N, 3, R, R) uint8 images -> (N, R, R, 3) uint8."""
    from mvc.diffusion.sd_io import encode_images, uint8_to_model

    p = next(vae.parameters())
    out = []
    for i in range(0, len(images), batch_size):
        z, _ = encode_images(vae, uint8_to_model(images[i:i + batch_size]), batch_size)
        out.append(to_hwc(vae.decode(z.to(p.device, p.dtype)).sample.float()))
    return np.concatenate(out)


@torch.no_grad()
def base_samples(base: str, captions: list[str], resolution: int, seed: int, steps: int, guidance: float,
                 device: Any = None, batch_size: int = 32) -> np.ndarray:
    """Text-to-image samples of the base pipeline from `captions` (DDIM), one seeded generator each."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from mvc.diffusion.models import load_pipeline_components

    comps = load_pipeline_components(base)
    pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if device is not None:
        pipe.to(device)
    out = []
    for i in range(0, len(captions), batch_size):
        gens = [seeds.generator(seed, "diagnose", j) for j in range(i, min(i + batch_size, len(captions)))]
        ims = pipe(captions[i:i + batch_size], height=resolution, width=resolution, num_inference_steps=steps,
                   guidance_scale=guidance, generator=gens, output_type="np").images  # (b, R, R, 3) in [0, 1]
        out.append((np.asarray(ims) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def labelled_judge(checkpoint: str, classes: list[str]):
    """`dataset -> agreement` of a classifier trained on the labelled subset (the selector): the share of
    images it assigns to their intended class."""
    from mvc.classifier import load_classifier, predict_images

    bundle = load_classifier(checkpoint)
    if list(bundle.classes) != list(classes):
        raise MVCError(f"the selector {checkpoint} was trained on other classes than this dataset")
    if bundle.kind == "reference":
        raise MVCError(f"the selector {checkpoint} is the evaluation-only reference, which never selects; give a "
                       "classifier trained on the labelled subset alone (train_classifier.py)")

    def agreement(ds: Any) -> float:
        probs = predict_images(bundle, [ds.load_image(i) for i in range(len(ds))])
        return float((probs.argmax(1) == np.asarray(ds.targets)).mean()) if len(ds) else float("nan")
    return agreement


def guidance_grid(g: Any, text: list[float], image: list[float]) -> list[tuple[float, float]]:
    """(text, image) guidance pairs: each image scale at the configured text scale, then each text scale
    at the configured image scale (the configured pair once)."""
    pairs = [(g.guidance_scale, s) for s in image] + [(t, g.image_guidance_scale) for t in text]
    pairs.append((g.guidance_scale, g.image_guidance_scale))
    return list(dict.fromkeys((float(t), float(i)) for t, i in pairs))


def row_config(cfg: Any, out: Path, ops: list[str], guidance: float, image_guidance: float, per_class: int) -> Any:
    """The config that generates one row's synthetic set into `out`."""
    c = copy.deepcopy(cfg)
    c.mixing = dataclasses.replace(c.mixing, ops=list(ops))
    c.generate = dataclasses.replace(c.generate, method="mvc", out_dir=str(out),  # the fine-tuned model's rows
                                     grid_dir=str(out.parent / f"{out.name}_grids"),
                                     per_class=per_class, multiplier=None, guidance_scale=guidance,
                                     image_guidance_scale=image_guidance, filter_checkpoint=None)
    return c


def diagnose(cfg: Any, accelerator: Any, out: Path | None = None, variants: int = 2,
             text_guidance: list[float] | None = None, image_guidance: list[float] | None = None,
             base_rows: bool = True, selector: str | None = None, progress: bool = True) -> list[dict]:
    """Measure every stage of the chain (module docstring) and write the report; returns the rows.

    `selector`: a classifier checkpoint (or run folder) trained on the labelled subset alone (see above)."""
    from mvc.data import load_splits
    from mvc.data.captions import load_captions
    from mvc.data.synthetic import load_synthetic_set
    from mvc.diffusion.models import training_info
    from mvc.diffusion.sd_io import images_to_uint8
    from mvc.evaluation.evaluate import load_reference, measure, real_subset, source_rows
    from mvc.generation.generate import generate_synthetic
    from mvc.generation.generators import load_finetuned, resolve_resolution

    paths = RunPaths.of(cfg)
    # absolute: generation takes a relative generate.out_dir as relative to the run folder
    out = (Path(out) if out else paths.root / "diagnose").resolve()
    if not (paths.final / "model_index.json").is_file():
        raise MVCError(f"no fine-tuned model at {paths.final}; run train_mvc.py first")
    t0 = time.time()
    labelled, _pool, test = load_splits(cfg.data)
    real = real_subset(cfg, test)
    ref = load_reference(cfg, accelerator, progress)
    pipe = load_finetuned(paths.final, cfg.generate.scheduler, accelerator.device)
    res = resolve_resolution(cfg.generate, paths.final, pipe)
    ev, dev, none = cfg.evaluate, accelerator.device, np.full(len(real), -1)
    judge = labelled_judge(selector, labelled.classes) if selector else None
    rows: list[dict] = []

    def add(name: str, stage: str, syn: Any, sources: np.ndarray, **extra: Any) -> None:
        m = measure(ref, syn, sources, labelled, real, ev, dev)
        if judge is not None:
            extra["selector_agreement"] = judge(syn)
        rows.append({"row": name, "stage": stage, **extra, "images": m["images"],
                     "fidelity": m["fidelity"]["overall"], "per_class": m["fidelity"]["per_class"],
                     "confidence": m["confidence"], "fd": m["frechet"]["synthetic_vs_test"],
                     "fd_real": m["frechet"]["labelled_vs_test"], "diversity_ratio": m["diversity"]["ratio"]})
        log.info("diagnose: %s: fidelity %.1f%%", name, 100 * rows[-1]["fidelity"])

    # 1-2. the resolution and the VAE, on the real test images compared with
    real_r = images_to_uint8([real.load_image(i) for i in range(len(real))], res)  # (N, 3, R, R)
    add(f"real test images at {res} px", "real", in_memory(real_r.permute(0, 2, 3, 1).numpy(), real, "real"), none)
    add("VAE round trip (encode mean, decode)", "vae", in_memory(vae_round_trip(pipe.vae, real_r), real, "vae"), none)

    # 3. the base before fine-tuning, from the label-free captions of the labelled images
    captions = load_captions(cfg, labelled, progress=False)
    base = training_info(paths.final).get("base_source")
    if base_rows and base and Path(str(base)).is_dir():
        caps = [captions[i] for i in labelled.ids]
        ims = base_samples(str(base), caps, res, cfg.run.seed or 0, cfg.generate.num_inference_steps,
                           cfg.generate.guidance_scale, dev)
        add("base, text-to-image from the label-free captions", "base", in_memory(ims, labelled, "base"),
            np.arange(len(labelled)))
    elif base_rows:
        log.warning("diagnose: the base %r is not a local folder; skipping its row", base)

    # 4-5. the fine-tuned model: no mixing over the guidance grid, then each op
    per_class = variants * int(np.bincount(labelled.targets).max())
    g = cfg.generate
    sets = [("no mixing", ["none"], t, i) for t, i in guidance_grid(g, text_guidance or [1.5, 7.5],
                                                                     image_guidance or [1.0, 3.0, 5.0])]
    sets += [(f"mixing: {op}", [op], g.guidance_scale, g.image_guidance_scale) for op in cfg.mixing.ops if op != "none"]
    for label, ops, t, i in sets:
        name = f"fine-tuned, {label}, guidance {t:g} / image {i:g}"
        set_dir = out / "sets" / safe_name(name)
        generate_synthetic(row_config(cfg, set_dir, ops, t, i, per_class), labelled=labelled, captions=captions,
                           pipe=pipe, progress=progress)
        syn = load_synthetic_set(set_dir, labelled.classes)
        add(name, "fine-tuned", syn, source_rows(set_dir, labelled.classes, labelled, syn), ops=ops,
            guidance_scale=t, image_guidance_scale=i)
    if accelerator.is_main_process:
        write_diagnosis(rows, out, cfg, labelled.classes, ref, time.time() - t0)
    return rows


def write_diagnosis(rows: list[dict], out: Path, cfg: Any, classes: list[str], ref: Any, seconds: float) -> None:
    """diagnose.json, diagnose.md (the table), diagnose.png (fidelity per row and per class), TensorBoard."""
    from mvc.evaluation.evaluate import NOTE

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "diagnose.json", {"rows": rows, "classes": classes, "seconds": round(seconds, 1),
                                              "reference": str(ref.folder), "note": NOTE})
    sel = any("selector_agreement" in r for r in rows)
    lines = [f"# Where the class is lost ({cfg.data.name}, `{RunPaths.of(cfg).final}`)", "", NOTE +
             f" Reference: {100 * (ref.info.get('test_accuracy') or float('nan')):.1f}% on the test split."
             + (" Selector: a classifier trained on the labelled subset alone; choose settings by its column, "
                "never by the reference's." if sel else ""), "",
             "| stage | images | label fidelity (%) | " + ("selector agreement (%) | " if sel else "")
             + "confidence | FD-ref (real floor) | diversity ratio |", "|---|---|---|" + ("---|" if sel else "")
             + "---|---|---|"]
    for r in rows:
        s = f" {100 * r['selector_agreement']:.1f} |" if sel else ""
        lines.append(f"| {r['row']} | {r['images']} | {100 * r['fidelity']:.1f} |{s} {r['confidence']:.2f} | "
                     f"{r['fd']:.2f} ({r['fd_real']:.2f}) | {r['diversity_ratio']:.2f} |")
    lines += ["", "Per class (label fidelity, %):", "", "| stage | " + " | ".join(c[:10] for c in classes) + " |",
              "|---|" + "---|" * len(classes)]
    for r in rows:
        lines.append(f"| {r['row']} | " + " | ".join("-" if v is None else f"{100 * v:.0f}" for v in r["per_class"])
                     + " |")
    lines += ["", "![fidelity per stage and class](diagnose.png)", ""]
    atomic_write_text(out / "diagnose.md", "\n".join(lines))
    fig = figure(rows, classes)
    logger = RunLogger(out)
    try:
        for i, r in enumerate(rows):
            logger.scalars(i, {"fidelity": r["fidelity"], "fd": r["fd"], "confidence": r["confidence"]},
                           prefix="diagnose/")
        logger.figure("diagnose/fidelity", fig, 0, path=out / "diagnose.png")
    finally:
        logger.close()
        import matplotlib.pyplot as plt

        plt.close(fig)


def figure(rows: list[dict], classes: list[str]):
    """Left: overall fidelity per stage; right: a stage x class heat map of fidelity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["row"] for r in rows]
    per = np.array([[np.nan if v is None else 100 * v for v in r["per_class"]] for r in rows])
    fig, (a, b) = plt.subplots(1, 2, figsize=(6 + 0.45 * len(classes), 0.42 * len(rows) + 1.6),
                               gridspec_kw={"width_ratios": [1, max(1.0, len(classes) / 8)]})
    y = np.arange(len(rows))
    a.barh(y, [100 * r["fidelity"] for r in rows], color="#7aa6d6")
    a.set_yticks(y, names, fontsize=7)
    a.invert_yaxis()
    a.set_xlim(0, 100)
    a.set_xlabel("label fidelity (%)")
    a.grid(axis="x", alpha=0.3)
    im = b.imshow(per, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    b.set_xticks(np.arange(len(classes)), [c[:10] for c in classes], rotation=60, ha="right", fontsize=7)
    b.set_yticks([])
    fig.colorbar(im, ax=b, fraction=0.04, label="fidelity (%)")
    fig.tight_layout()
    return fig


def read_rows(out: Path) -> list[dict]:
    """The rows of a finished diagnosis."""
    p = Path(out) / "diagnose.json"
    if not p.is_file():
        raise MVCError(f"no diagnosis in {out}; run scripts/diagnose_generator.py first")
    return json.loads(p.read_text())["rows"]
