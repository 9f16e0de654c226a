"""Synthetic-set generation with Mixing Visual Concepts: the loop that turns the plan into images.

For each class and each labelled (source) image, V variants are made: the source's prompt is mixed
(`mvc.mixing`) with the variant's own generator, and the fine-tuned InstructPix2Pix pipeline turns
(mixed embedding, source image) into an image, written in the synthetic-set format (`mvc.synthetic`).

Batching: per class, the token ids and embeddings of all its prompts are computed once
(`ClassPrompts`), and the condition latent of each source once (`mvc.sd_io`, as the pipeline does);
per batch, the token-edited prompts go through the text encoder in one call; then the batch goes
through the *diffusers pipeline itself* with `prompt_embeds`, `negative_prompt_embeds` and the
precomputed latents as `image` (the pipeline passes 4-channel tensors through as latents), plus one
`torch.Generator` per image. Calling the pipeline keeps the scheduler and guidance maths exactly
diffusers'; the list of generators makes image i independent of the batch it is in.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from itertools import groupby
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from mvc import seeds
from mvc.captions import load_captions
from mvc.distributed import resolve_dtype
from mvc.mixing import ClassPrompts, check_donors, mix_prompts, mixing_params, parse_window
from mvc.models import load_ip2p_pipeline, pipeline_resolution
from mvc.paths import RunPaths
from mvc.sd_io import encode_conditions, encode_ids, encode_prompts
from mvc.synthetic import SyntheticSet, make_record, plan_jobs, shard_jobs, write_grids
from mvc.utils import MVCError, append_jsonl, atomic_write_json, batched

log = logging.getLogger(__name__)


#################################################################################
#                                  Rendering                                    #
#################################################################################

def render(pipe, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor, cond_latents: torch.Tensor,
           generators: list[torch.Generator], num_inference_steps: int, guidance_scale: float,
           image_guidance_scale: float) -> list:
    """One pipeline call for a batch: (B, T, D) embeddings, (B, 4, h, w) condition latents, B generators -> B PIL images."""
    return pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, image=cond_latents,
                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                image_guidance_scale=image_guidance_scale, generator=generators, output_type="pil").images


def build_filter(checkpoint: str, classes: Sequence[str]) -> Callable[[list], np.ndarray]:
    """A predictor `images -> probs (N, C)` from a classifier checkpoint trained on the labelled subset."""
    from mvc.classifier import load_classifier, predict_images

    bundle = load_classifier(checkpoint)
    if bundle.kind == "reference":
        raise MVCError(f"generate.filter_checkpoint {checkpoint} is the evaluation-only reference classifier, which "
                       "never filters; give a classifier trained on the labelled subset (train_classifier.py)")
    if list(bundle.classes) != list(classes):
        raise MVCError(f"the filter classifier {checkpoint} was trained on other classes "
                       f"({len(bundle.classes)}) than this dataset ({len(classes)})")
    return lambda images: predict_images(bundle, images)


def generation_settings(cfg: Any, model_dir: Path, labelled: Any, resolution: int, dtype: str = "fp32") -> dict:
    """Everything that changes the images (not the set size, batch size or grids)."""
    g = cfg.generate
    return {"dtype": dtype,
        "method": "mvc", "model_dir": str(Path(model_dir).resolve()), "data": labelled.fingerprint(),
        "classes": list(labelled.classes), "captioner": cfg.captions.captioner,
        "prompt_template": cfg.captions.prompt_template, "mixing": dataclasses.asdict(cfg.mixing),
        "num_inference_steps": g.num_inference_steps, "guidance_scale": g.guidance_scale,
        "image_guidance_scale": g.image_guidance_scale, "scheduler": g.scheduler, "resolution": resolution,
        "filter_checkpoint": g.filter_checkpoint,
        "filter_threshold": g.filter_threshold if g.filter_checkpoint else None, "seed": cfg.run.seed,
    }


def resolve_resolution(cfg: Any, model_dir: Path, pipe: Any = None) -> int:
    """The sampling resolution: `generate.resolution`, else the one the model was fine-tuned at."""
    from mvc.models import training_info

    tuned = training_info(model_dir).get("resolution")
    if cfg.generate.resolution is not None:
        if tuned and int(tuned) != int(cfg.generate.resolution):
            log.warning("generating at generate.resolution=%d, but %s was fine-tuned at %d px",
                        cfg.generate.resolution, model_dir, tuned)
        return int(cfg.generate.resolution)
    if tuned:
        return int(tuned)
    if pipe is None:
        pipe = load_ip2p_pipeline(model_dir, cfg.generate.scheduler)
    return pipeline_resolution(model_dir, pipe)


#################################################################################
#                                  Generation                                   #
#################################################################################

def generate_synthetic(cfg: Any, *, labelled: Any = None, captions: dict[str, str] | None = None, pipe: Any = None,
                       predictor: Callable[[list], np.ndarray] | None = None, rank: int = 0, world: int = 1,
                       barrier: Callable[[], None] | None = None, device: Any = None, progress: bool = True) -> dict:
    """Make the missing images of this process's share; the main process (rank 0) prepares and merges.

    `labelled`, `captions`, `pipe` and `predictor` default to what the config names (tests inject
    them). With several processes, pass `barrier` (e.g. `accelerator.wait_for_everyone`). Returns a
    summary dict (counts, images/s).
    """
    from tqdm.auto import tqdm

    barrier = barrier or (lambda: None)
    g, main, paths = cfg.generate, rank == 0, RunPaths.of(cfg)
    out, model_dir = SyntheticSet(paths.synthetic), paths.final
    ops, window, params = list(cfg.mixing.ops), parse_window(cfg.mixing.window), mixing_params(cfg.mixing)
    if labelled is None:
        from mvc.data import load_splits

        labelled = load_splits(cfg.data)[0]
    jobs = plan_jobs(labelled, ops, g.multiplier, g.per_class)
    check_donors(np.bincount(labelled.targets, minlength=len(labelled.classes)), labelled.classes, ops, params)
    res = resolve_resolution(cfg, model_dir, pipe)
    dtype = pipe.unet.dtype if pipe is not None else resolve_dtype(g.dtype, device if device is not None else "cpu")
    dtype_name = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")

    # 1. the main process records/checks the settings and reconciles files and records
    settings = generation_settings(cfg, model_dir, labelled, res, dtype_name)
    if main:
        settings = out.prepare(settings, labelled.classes)
        out.reconcile(jobs)
    barrier()
    if not main:  # checks what the main process recorded (records it only when this rank runs on its own)
        settings = out.prepare(settings, labelled.classes)
    if captions is None:  # every process captions its share of what the cache lacks (usually nothing)
        captions = load_captions(cfg, labelled, progress, device, rank, world, barrier)
    seed = int(settings["seed"])
    done = out.done()
    todo = [j for j in shard_jobs(jobs, rank, world) if j.file not in done]

    # 2. this process's share
    t0, made, rejected, clamped = time.perf_counter(), 0, 0, 0
    t_render = t0  # after loading: the img/s figure counts sampling only
    if todo:
        missing = [labelled.ids[j.source] for j in todo if labelled.ids[j.source] not in captions]
        if missing:
            raise MVCError(f"no caption for {len(missing)} source image(s), e.g. {missing[0]!r}")
        if pipe is None:
            pipe = load_ip2p_pipeline(model_dir, g.scheduler, device, dtype=dtype)
        if predictor is None and g.filter_checkpoint:
            predictor = build_filter(g.filter_checkpoint, labelled.classes)
        neg = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""])  # (1, T, D), the pipeline's unconditional text
        encode = lambda ids, mask: encode_ids(pipe.text_encoder, ids, mask)  # noqa: E731
        t_render = time.perf_counter()
        bar = tqdm(total=len(todo), desc=f"generate (rank {rank})" if world > 1 else "generate", unit="img",
                   disable=not progress)
        for label, cjobs in groupby(todo, key=lambda j: j.label):
            cjobs = list(cjobs)
            sources = np.flatnonzero(np.asarray(labelled.targets) == label).tolist()
            ids = [str(labelled.ids[s]) for s in sources]
            ctx = ClassPrompts.build(sources, ids, [captions[i] for i in ids], labelled.classes[label],
                                     cfg.captions.prompt_template, window, pipe.tokenizer, encode)
            srcs = sorted({j.source for j in cjobs})
            lat = encode_conditions(pipe.vae, [labelled.load_image(s) for s in srcs], res, g.batch_size)
            cond = {s: lat[i] for i, s in enumerate(srcs)}  # each (4, h, w)
            for batch in batched(cjobs, g.batch_size):
                embeds, op_ps, cl = mix_prompts(batch, ctx, params, seed, encode, pipe.tokenizer.convert_ids_to_tokens)
                clamped += cl
                gens = [seeds.generator(seed, "generate.image", j.source, j.variant) for j in batch]
                images = render(pipe, embeds, neg.expand(len(batch), -1, -1), torch.stack([cond[j.source] for j in batch]),
                                gens, g.num_inference_steps, g.guidance_scale, g.image_guidance_scale)
                recs = [make_record(j, method="mvc", op_params=op_p, caption=ctx.captions[j.source], seed=seed,
                                    generator_seed=gen.initial_seed(), guidance_scale=g.guidance_scale,
                                    image_guidance_scale=g.image_guidance_scale,
                                    num_inference_steps=g.num_inference_steps, scheduler=g.scheduler,
                                    resolution=res, model_dir=str(model_dir))
                        for j, op_p, gen in zip(batch, op_ps, gens)]
                keep = apply_filter(predictor, images, batch, recs, len(labelled.classes), g.filter_threshold)
                for j, im, rec, k in zip(batch, images, recs, keep):
                    if k:
                        out.save_image(im, j)
                        out.append(rank, rec)  # after the file exists: a record always has its file
                        made += 1
                    else:
                        out.append(rank, rec, rejected=True)
                        rejected += 1
                bar.update(len(batch))
        bar.close()
    t_end = time.perf_counter()
    seconds, render_s = t_end - t0, t_end - t_render
    if clamped:
        log.warning("%d variants had a caption window shorter than mixing.coarse_k/fine_m; k/m were lowered "
                    "to the window size (recorded in op_params)", clamped)

    # 3. the main process merges every rank's records, then writes grids and a summary
    barrier()
    summary = {"rank": rank, "world": world, "planned": len(jobs), "made": made, "rejected_now": rejected,
               "resolution": res, "dtype": dtype_name, "device": str(device if device is not None else "cpu"),
               "seconds": round(seconds, 3), "load_seconds": round(seconds - render_s, 3),
               "images_per_s": round((made + rejected) / render_s, 4) if render_s > 0 else None}
    if main:
        counts = out.reconcile(jobs)
        summary.update(images=counts["images"], rejected=counts["rejected"])
        write_grids(out.root, paths.grids, labelled, jobs, g.grid_sources, summary)
        atomic_write_json(paths.grids / "summary.json", summary)  # this run
        append_jsonl(paths.grids / "runs.jsonl", summary)  # every run: which processes, device, dtype made the set
    return summary


def apply_filter(predictor: Callable[[list], np.ndarray] | None, images: list, batch: Sequence[Any], recs: list[dict],
                 num_classes: int, threshold: float) -> list[bool]:
    """Which images of a batch to keep: all without a filter; else those the filter assigns to their class
    with confidence >= `threshold` (the score is recorded either way)."""
    if predictor is None:
        return [True] * len(batch)
    probs = np.asarray(predictor(images))  # (B, C)
    if probs.ndim != 2 or probs.shape != (len(batch), num_classes):
        raise MVCError(f"the filter returned probabilities of shape {probs.shape}, expected ({len(batch)}, {num_classes})")
    keep = []
    for i, j in enumerate(batch):
        score = float(probs[i, j.label])
        recs[i]["filter_score"] = score
        keep.append(int(probs[i].argmax()) == j.label and score >= threshold)
    return keep
