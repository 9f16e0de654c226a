"""Batched synthetic-set generation with Mixing Visual Concepts (the work of generate_mvc.py).

For each class and each labelled (source) image, V variants are made: the source's prompt is
mixed (`mvc.mixing`) with the variant's own generator, and the fine-tuned InstructPix2Pix
pipeline turns (mixed embedding, source image) into an image. Coarse mixing edits the prompt's
token ids before the text encoder (`mixing.coarse_stage=tokens`, the default) or its output
embedding ('embeds'); fine mixing edits the embedding.

Batching: per class, the token ids and prompt embeddings of all its sources are computed once,
and the condition latent of each source once (VAE mode, as the pipeline does); per batch of
jobs, the token-edited prompts go through the text encoder in one call; then batches of jobs
go through the *diffusers pipeline itself* with `prompt_embeds`, `negative_prompt_embeds` and
the precomputed latents as `image` (the pipeline passes 4-channel tensors through as latents),
plus one `torch.Generator` per image. We call the pipeline rather than a hand-written loop so
that scheduler and guidance maths stay exactly diffusers' (the IP2P pipeline builds
[text, uncond, uncond] embeddings and [image, image, zeros] latents itself); the list of
generators makes image i independent of the batch it is in.

Files (`out` = generate.out_dir): `<out>/<safe class>/<safe source id>_v<variant:03d>.png`, one
line per image in `<out>/metadata.jsonl`, `<out>/generation.json` (the settings the folder was
made with; a rerun with other settings is refused), and, while running, per-rank
`metadata.rank<r>.jsonl` / `rejected.rank<r>.jsonl` that the main process merges. Grids and
TensorBoard go to `<out>_grids/` (so that `<out>` holds class folders only and torchvision's
ImageFolder reads it as is).

Crash safety: PNGs are written atomically and their metadata line is appended after the file
exists; on start the main process reconciles lines and files (lines without files dropped,
files without lines regenerated, stray temp files removed), so a rerun makes only what is
missing.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from mvc.captions import load_captions, validate_template
from mvc.mixing import apply_mixing, caption_token_span, mixing_params, op_needs_donor, op_params, op_stages, parse_op
from mvc.utils import (
    MVCError,
    RunLogger,
    append_jsonl,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    batched,
    fingerprint,
    image_grid,
    make_generator,
    read_jsonl,
    resolve_seed,
    safe_name,
)

log = logging.getLogger(__name__)

SETTINGS_FILE = "generation.json"
METADATA = "metadata.jsonl"
REJECTED = "rejected.jsonl"
FORMAT_VERSION = 1

# config name -> diffusers scheduler class (and extra kwargs)
SCHEDULERS = {
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmpp": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
}


#################################################################################
#                                  Pipeline                                     #
#################################################################################

def build_scheduler(name: str, config: Any):
    """A diffusers scheduler named by `generate.scheduler`, built from the model's scheduler config."""
    import diffusers

    if name not in SCHEDULERS:
        raise MVCError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cls_name, kw = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(config, **kw)


def load_pipeline(model_dir: str | Path, scheduler: str = "euler_ancestral", device: Any = None):
    """The fine-tuned `StableDiffusionInstructPix2PixPipeline` folder, with the chosen scheduler."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    path = Path(model_dir)
    if not (path / "model_index.json").is_file():
        raise MVCError(f"no fine-tuned pipeline at {path} (model_index.json missing); run train_mvc.py first "
                       f"or set generate.model_dir")
    try:
        pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
            path, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    except (OSError, ValueError, KeyError) as e:
        raise MVCError(f"cannot load the pipeline at {path}: {str(e).splitlines()[0]}") from None
    if pipe.unet.config.in_channels != 2 * pipe.vae.config.latent_channels:
        raise MVCError(f"{path}: the U-Net takes {pipe.unet.config.in_channels} input channels, not "
                       f"{2 * pipe.vae.config.latent_channels}; is it an InstructPix2Pix (MVC fine-tuned) model?")
    if pipe.vae.config.latent_channels != 4:
        raise MVCError(f"{path}: the InstructPix2Pix pipeline needs a VAE with 4 latent channels")
    pipe.scheduler = build_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if device is not None:
        pipe.to(device)
    return pipe


def model_resolution(pipe) -> int:
    """Pixel size the U-Net was built for (sample_size x VAE scale factor)."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def tokenize_prompts(pipe, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask (N, T) of prompts, padded/truncated as the IP2P pipeline does."""
    tok = pipe.tokenizer
    t = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    return t.input_ids, t.attention_mask


@torch.no_grad()
def encode_ids(pipe, ids: torch.Tensor, mask: torch.Tensor | None = None, batch_size: int = 64) -> torch.Tensor:
    """Text-encoder hidden states (N, T, D) of token ids (N, T), exactly as the IP2P pipeline computes them."""
    enc = pipe.text_encoder
    use_mask = mask is not None and getattr(enc.config, "use_attention_mask", False)
    out = []
    for i in range(0, len(ids), batch_size):
        m = mask[i:i + batch_size].to(enc.device) if use_mask else None
        out.append(enc(ids[i:i + batch_size].to(enc.device), attention_mask=m)[0])
    return torch.cat(out).to(dtype=enc.dtype)


def encode_prompts(pipe, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Text-encoder hidden states (N, T, D) of prompts, exactly as the IP2P pipeline computes them."""
    return encode_ids(pipe, *tokenize_prompts(pipe, prompts), batch_size=batch_size)


@torch.no_grad()
def encode_conditions(pipe, images: Sequence, resolution: int, batch_size: int = 64) -> torch.Tensor:
    """Condition latents (N, 4, h, w) of PIL images: resized, normalised, VAE mode (the pipeline's 'argmax')."""
    from PIL import Image

    out = []
    for chunk in batched(list(images), batch_size):
        ims = [im.convert("RGB").resize((resolution, resolution), Image.BICUBIC) for im in chunk]
        x = pipe.image_processor.preprocess(ims).to(device=pipe.vae.device, dtype=pipe.vae.dtype)  # (B, 3, H, W)
        out.append(pipe.vae.encode(x).latent_dist.mode())
    return torch.cat(out)


def render(pipe, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor, cond_latents: torch.Tensor,
           generators: list[torch.Generator], num_inference_steps: int, guidance_scale: float,
           image_guidance_scale: float) -> list:
    """One pipeline call for a batch: (B, T, D) embeddings, (B, 4, h, w) condition latents, B generators -> B PIL images."""
    return pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, image=cond_latents,
                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                image_guidance_scale=image_guidance_scale, generator=generators, output_type="pil").images


def save_image(image, path: Path) -> None:
    """Write one PNG atomically (the unit a crash can interrupt)."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


#################################################################################
#                                    Plan                                       #
#################################################################################

@dataclass(frozen=True)
class Job:
    """One synthetic image: which source, which variant, which op; `index` is its place in the plan."""
    index: int
    label: int
    class_name: str
    source: int  # position of the source image in the labelled subset
    source_id: str
    variant: int
    op: str

    @property
    def file(self) -> str:
        """Path relative to the output folder."""
        return f"{safe_name(self.class_name)}/{safe_name(self.source_id)}_v{self.variant:03d}.png"


def class_target(n_real: int, multiplier: float | None, per_class: int | None) -> int:
    """Synthetic images for a class with `n_real` labelled images."""
    if per_class is not None:
        return int(per_class)
    if multiplier is None:
        raise MVCError("set generate.multiplier or generate.per_class")
    return int(round(float(multiplier) * n_real))


def variants_per_source(n_sources: int, total: int) -> list[int]:
    """Spread `total` variants over `n_sources` sources: equal shares, the remainder to the first ones."""
    q, r = divmod(int(total), int(n_sources))
    return [q + (1 if i < r else 0) for i in range(n_sources)]


def plan_jobs(labelled: Any, ops: Sequence[str], multiplier: float | None = 4.0,
              per_class: int | None = None) -> list[Job]:
    """Every image to make, in a fixed order (class, source, variant); variant v uses ops[v % len(ops)]."""
    ops = list(ops)
    if not ops:
        raise MVCError("mixing.ops is empty; give at least one op, e.g. [coarse, fine] (or [none] for no mixing)")
    for op in ops:
        parse_op(op)
    jobs: list[Job] = []
    targets = np.asarray(labelled.targets)
    for c, name in enumerate(labelled.classes):
        sources = np.flatnonzero(targets == c).tolist()
        if not sources:
            continue
        shares = variants_per_source(len(sources), class_target(len(sources), multiplier, per_class))
        for s, v_count in zip(sources, shares):
            for v in range(v_count):
                jobs.append(Job(len(jobs), c, name, int(s), str(labelled.ids[s]), v, ops[v % len(ops)]))
    seen: dict[str, Job] = {}
    for j in jobs:
        if j.file in seen:
            o = seen[j.file]
            raise MVCError(f"classes/ids {o.class_name!r}/{o.source_id!r} and {j.class_name!r}/{j.source_id!r} "
                           f"map to the same file {j.file}; rename one")
        seen[j.file] = j
    return jobs


def shard_jobs(jobs: Sequence[Job], rank: int, world: int) -> list[Job]:
    """This process's disjoint share: jobs whose plan index is `rank` modulo `world`."""
    if not 0 <= rank < world:
        raise MVCError(f"rank {rank} is not in 0..{world - 1}")
    return [j for j in jobs if j.index % world == rank]


#################################################################################
#                         Output folder: settings, reconcile                    #
#################################################################################

def generation_settings(cfg: Any, model_dir: Path, labelled: Any) -> dict:
    """Everything that changes the images (not the set size, batch size or grids)."""
    g = cfg.generate
    return {
        "model_dir": str(Path(model_dir).resolve()), "data": labelled.fingerprint(), "classes": list(labelled.classes),
        "captioner": cfg.captions.captioner, "prompt_template": cfg.captions.prompt_template,
        "mixing": dataclasses.asdict(cfg.mixing), "num_inference_steps": g.num_inference_steps,
        "guidance_scale": g.guidance_scale, "image_guidance_scale": g.image_guidance_scale, "scheduler": g.scheduler,
        "resolution": g.resolution, "filter_checkpoint": g.filter_checkpoint,
        "filter_threshold": g.filter_threshold if g.filter_checkpoint else None, "seed": cfg.run.seed,
    }


def prepare_out_dir(out: Path, settings: dict) -> dict:
    """Check (or record) the settings `out` is made with; a null seed reuses the recorded one. Returns them."""
    path = out / SETTINGS_FILE
    if path.is_file():
        import json

        old = json.loads(path.read_text())["settings"]
        if settings["seed"] is None:
            settings = {**settings, "seed": old["seed"]}
        if fingerprint(old) != fingerprint(settings):
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise MVCError(f"{out} holds images made with other settings (differ: {', '.join(diff)}); "
                           f"set another generate.out_dir or delete that folder")
        return settings
    if out.is_dir() and any(out.iterdir()):
        raise MVCError(f"{out} exists and was not made by generate_mvc.py ({SETTINGS_FILE} missing); "
                       f"set another generate.out_dir or empty it")
    settings = {**settings, "seed": resolve_seed(settings["seed"])}
    atomic_write_json(path, {"format": FORMAT_VERSION, "settings": settings, "fingerprint": fingerprint(settings)})
    return settings


def _merge_lines(out: Path, stem: str) -> list[dict]:
    """Lines of `<stem>.jsonl` then of every `<stem>.rank*.jsonl` (a crash may leave any of them)."""
    lines = read_jsonl(out / f"{stem}.jsonl")
    for part in sorted(out.glob(f"{stem}.rank*.jsonl")):
        lines.extend(read_jsonl(part))
    return lines


def reconcile(out: Path, jobs: Sequence[Job]) -> dict:
    """Make `metadata.jsonl` / `rejected.jsonl` agree with the files (main process only).

    Lines whose file is missing or not in the plan are dropped; duplicates keep the first line;
    files without a line stay pending (they are regenerated, atomically); temp files of an
    interrupted write and images outside the current plan are deleted. Per-rank files are merged.
    """
    plan = {j.file: j for j in jobs}
    kept: dict[str, dict] = {}
    for rec in _merge_lines(out, "metadata"):
        f = rec.get("file")
        if f in plan and f not in kept and (out / f).is_file():
            kept[f] = rec
    rejected: dict[str, dict] = {}
    for rec in _merge_lines(out, "rejected"):
        f = rec.get("file")
        if f in plan and f not in kept and f not in rejected and not (out / f).is_file():
            rejected[f] = rec
    stale = 0
    for d in (p for p in out.iterdir() if p.is_dir()):
        for f in d.iterdir():
            rel = f"{d.name}/{f.name}"
            if f.name.startswith("."):  # temp file of an interrupted atomic write
                f.unlink(missing_ok=True)
            elif f.suffix == ".png" and rel not in plan:
                f.unlink()
                stale += 1
        if not any(d.iterdir()):
            d.rmdir()
    if stale:
        log.warning("removed %d images outside the current plan (a smaller generate.multiplier/per_class)", stale)
    order = lambda recs: sorted(recs.values(), key=lambda r: plan[r["file"]].index)  # noqa: E731
    atomic_write_text(out / METADATA, "".join(_dumps(r) for r in order(kept)))
    if rejected or (out / REJECTED).exists():
        atomic_write_text(out / REJECTED, "".join(_dumps(r) for r in order(rejected)))
    for part in list(out.glob("metadata.rank*.jsonl")) + list(out.glob("rejected.rank*.jsonl")):
        part.unlink(missing_ok=True)
    return {"images": len(kept), "rejected": len(rejected), "stale_removed": stale}


def _dumps(rec: dict) -> str:
    import json

    return json.dumps(rec, default=str) + "\n"


#################################################################################
#                                  Generation                                   #
#################################################################################

def build_filter(checkpoint: str, classes: Sequence[str]) -> Callable[[list], np.ndarray]:
    """A predictor `images -> probs (N, C)` from a real-data classifier checkpoint (mvc.classifier)."""
    from mvc.classifier import load_classifier, predict_images

    bundle = load_classifier(checkpoint)
    if list(bundle.classes) != list(classes):
        raise MVCError(f"the filter classifier {checkpoint} was trained on other classes "
                       f"({len(bundle.classes)}) than this dataset ({len(classes)})")
    return lambda images: predict_images(bundle, images)


def _window_cfg(window: Any) -> tuple[int, int] | None:
    """mixing.window: 'caption' -> None (each source's caption span), or a checked [start, end)."""
    if window == "caption":
        return None
    if isinstance(window, (list, tuple)) and len(window) == 2 and all(isinstance(v, int) for v in window):
        return int(window[0]), int(window[1])
    raise MVCError(f"mixing.window must be 'caption' or [start, end), got {window!r}")


class _ClassContext:
    """Per-class state computed once: prompts, their token ids and embeddings, caption windows."""

    def __init__(self, pipe, labelled, label: int, captions: dict, template: str, window: tuple[int, int] | None):
        from mvc.captions import make_prompt

        self.sources = np.flatnonzero(np.asarray(labelled.targets) == label).tolist()
        name = labelled.classes[label]
        self.ids = {s: str(labelled.ids[s]) for s in self.sources}
        self.captions = {s: captions[self.ids[s]] for s in self.sources}
        prompts = {s: make_prompt(template, self.captions[s], name) for s in self.sources}
        uniq = sorted(set(prompts.values()))  # identical prompts are encoded once
        tok, mask = tokenize_prompts(pipe, uniq)  # (U, T), (U, T)
        emb = encode_ids(pipe, tok, mask)  # (U, T, D)
        row = {s: uniq.index(prompts[s]) for s in self.sources}
        self.tokens = {s: tok[row[s]] for s in self.sources}  # each (T,), for token-stage mixing
        self.masks = {s: mask[row[s]] for s in self.sources}  # each (T,)
        self.embeds = {s: emb[row[s]] for s in self.sources}  # each (T, D)
        T = emb.shape[1]
        self.caption_windows = window is None
        if window is not None:
            if not 0 <= window[0] < window[1] <= T:
                raise MVCError(f"mixing.window {list(window)} is not a non-empty range inside the {T} token positions")
            self.windows = {s: window for s in self.sources}
        else:
            self.windows = {s: caption_token_span(pipe.tokenizer, template, self.captions[s], name)
                            for s in self.sources}


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
    g, main = cfg.generate, rank == 0
    out = Path(g.out_dir or Path(cfg.run.output_dir) / "synthetic")
    model_dir = Path(g.model_dir or Path(cfg.run.output_dir) / "mvc" / "final")
    ops = list(cfg.mixing.ops)
    window = _window_cfg(cfg.mixing.window)
    params = mixing_params(cfg.mixing)
    validate_template(cfg.captions.prompt_template)  # before any data or model loading
    if labelled is None:
        from mvc.data import load_splits

        labelled = load_splits(cfg.data)[0]
    jobs = plan_jobs(labelled, ops, g.multiplier, g.per_class)
    for op in ops:
        op_stages(op, params)  # a composite that edits token ids after embeddings fails before any work
    for c in range(len(labelled.classes)):
        n = int((np.asarray(labelled.targets) == c).sum())
        if n == 1 and any(op_needs_donor(op, params) for op in ops):
            raise MVCError(f"class {labelled.classes[c]!r} has one labelled image, but donor mixing needs two: "
                           f"set mixing.coarse_mode=shuffle and mixing.fine_source=self (or noise)")

    # 1. the main process records/checks the settings and reconciles files and metadata
    settings = generation_settings(cfg, model_dir, labelled)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        settings = prepare_out_dir(out, settings)
        reconcile(out, jobs)
        if captions is None:  # caption first on the main process; the others then read its cache
            captions = load_captions(cfg, labelled, progress)
    barrier()
    if not main:  # checks what the main process recorded (records it only when this rank runs on its own)
        out.mkdir(parents=True, exist_ok=True)
        settings = prepare_out_dir(out, settings)
    seed = int(settings["seed"])
    done = {r["file"] for r in read_jsonl(out / METADATA)} | {r["file"] for r in read_jsonl(out / REJECTED)}
    todo = [j for j in shard_jobs(jobs, rank, world) if j.file not in done]

    # 2. this process's share
    t0, made, rejected, clamped = time.perf_counter(), 0, 0, 0
    t_render = t0  # after loading: the img/s figure counts sampling only
    if todo:
        if captions is None:
            captions = load_captions(cfg, labelled, progress=False)
        missing = [labelled.ids[j.source] for j in todo if labelled.ids[j.source] not in captions]
        if missing:
            raise MVCError(f"no caption for {len(missing)} source image(s), e.g. {missing[0]!r}")
        if pipe is None:
            pipe = load_pipeline(model_dir, g.scheduler, device)
        if predictor is None and g.filter_checkpoint:
            predictor = build_filter(g.filter_checkpoint, labelled.classes)
        res = int(g.resolution or model_resolution(pipe))
        neg = encode_prompts(pipe, [""])  # (1, T, D), the pipeline's unconditional text
        meta_part, rej_part = out / f"metadata.rank{rank}.jsonl", out / f"rejected.rank{rank}.jsonl"
        t_render = time.perf_counter()
        bar = tqdm(total=len(todo), desc=f"generate (rank {rank})" if world > 1 else "generate", unit="img",
                   disable=not progress)
        for label, cjobs in groupby(todo, key=lambda j: j.label):
            cjobs = list(cjobs)
            ctx = _ClassContext(pipe, labelled, label, captions, cfg.captions.prompt_template, window)
            srcs = sorted({j.source for j in cjobs})
            lat = encode_conditions(pipe, [labelled.load_image(s) for s in srcs], res, g.batch_size)  # (S, 4, h, w)
            cond = {s: lat[i] for i, s in enumerate(srcs)}
            for batch in batched(cjobs, g.batch_size):
                embeds, recs, cl = mix_batch(pipe, batch, ctx, params, seed)  # (B, T, D): one text-encoder call
                clamped += cl
                gens = [make_generator(seed, j.source, j.variant) for j in batch]
                for rec, gen in zip(recs, gens):
                    rec.update(seed=seed, generator_seed=gen.initial_seed(), guidance_scale=g.guidance_scale,
                               image_guidance_scale=g.image_guidance_scale, num_inference_steps=g.num_inference_steps,
                               scheduler=g.scheduler, model_dir=str(model_dir))
                images = render(pipe, embeds, neg.expand(len(batch), -1, -1),
                                torch.stack([cond[j.source] for j in batch]), gens,
                                g.num_inference_steps, g.guidance_scale, g.image_guidance_scale)
                keep = [True] * len(batch)
                if predictor is not None:
                    probs = np.asarray(predictor(images))  # (B, C)
                    if probs.ndim != 2 or probs.shape[1] != len(labelled.classes):
                        raise MVCError(f"the filter returned probabilities of shape {probs.shape}, expected "
                                       f"({len(batch)}, {len(labelled.classes)})")
                    for i, j in enumerate(batch):
                        score = float(probs[i, j.label])
                        recs[i]["filter_score"] = score
                        keep[i] = int(probs[i].argmax()) == j.label and score >= g.filter_threshold
                for j, im, rec, k in zip(batch, images, recs, keep):
                    if k:
                        save_image(im, out / j.file)
                        append_jsonl(meta_part, rec)  # after the file exists: a line always has its file
                        made += 1
                    else:
                        append_jsonl(rej_part, rec)
                        rejected += 1
                bar.update(len(batch))
        bar.close()
    t_end = time.perf_counter()
    seconds, render_s = t_end - t0, t_end - t_render
    if clamped:
        log.warning("%d variants had a caption window shorter than mixing.coarse_k/fine_m; k/m were lowered "
                    "to the window size (recorded in op_params)", clamped)

    # 3. the main process merges every rank's lines, then writes grids and a summary
    barrier()
    summary = {"rank": rank, "world": world, "planned": len(jobs), "made": made, "rejected_now": rejected,
               "seconds": round(seconds, 3), "load_seconds": round(seconds - render_s, 3),
               "images_per_s": round((made + rejected) / render_s, 4) if render_s > 0 else None}
    if main:
        counts = reconcile(out, jobs)
        summary.update(images=counts["images"], rejected=counts["rejected"])
        grid_dir = Path(g.grid_dir) if g.grid_dir else out.parent / f"{out.name}_grids"
        write_grids(out, grid_dir, labelled, jobs, g.grid_sources, ops, summary)
        atomic_write_json(grid_dir / "summary.json", summary)
    return summary


@dataclass
class _JobMix:
    """One job's mixing draw: its generator, params (k/m fitted to the windows), windows and donor."""
    gen: torch.Generator
    params: dict
    stages: list[str]
    window: tuple[int, int]  # the source's window (fine, and coarse at the 'embeds' stage)
    coarse_window: tuple[int, int]  # where coarse runs at the 'tokens' stage
    donor: int | None
    clamped: int


def _plan_mix(j: Job, ctx: _ClassContext, params: dict, seed: int) -> _JobMix:
    """Draw the donor and fit k/m to the windows of one job (the first draws of its mixing generator)."""
    mg = make_generator(seed, j.source, j.variant, 1)  # the mixing draw, separate from the diffusion noise
    names, stages, p = parse_op(j.op), op_stages(j.op, params), dict(params)
    w = ctx.windows[j.source]
    donor = None
    if op_needs_donor(j.op, p):
        others = [s for s in ctx.sources if s != j.source]
        donor = others[int(torch.randint(len(others), (1,), generator=mg).item())]
    if w[1] <= w[0] and j.op != "none":
        raise MVCError(f"source {j.source_id!r} has an empty caption; set mixing.window=[start, end) to mix it")
    wc = w
    if "tokens" in stages and p.get("mode") == "swap" and ctx.caption_windows:
        # a donor token id past the end of the donor's caption would be template text or EOS/padding:
        # swap only where both captions have tokens (same class, same template: the same start)
        dw = ctx.windows[donor]
        wc = (max(w[0], dw[0]), min(w[1], dw[1]))
        if wc[1] <= wc[0]:
            raise MVCError(f"source {j.source_id!r} and its donor {ctx.ids[donor]!r} share no caption token "
                           f"positions; use mixing.coarse_mode=shuffle or a fixed mixing.window")
    T = int(ctx.embeds[j.source].shape[0])
    for key, name, win in (("k", "coarse", wc), ("m", "fine", w)):
        # a size no window can hold, or larger than a window the user fixed, is an error, not a clamp
        if name in names and (p[key] > T or (not ctx.caption_windows and p[key] > win[1] - win[0])):
            raise MVCError(f"{name} mixing {key}={p[key]} does not fit the window {list(win)} of {win[1] - win[0]} "
                           f"token positions (the embedding has {T}); lower {key} or widen mixing.window")
    clamped = 0
    if "coarse" in names and p["k"] > wc[1] - wc[0]:
        p["k"], clamped = wc[1] - wc[0], 1
    if "fine" in names and p["m"] > w[1] - w[0]:
        p["m"], clamped = w[1] - w[0], 1
    return _JobMix(mg, p, stages, w, wc, donor, clamped)


def mix_batch(pipe, jobs: Sequence[Job], ctx: _ClassContext, params: dict, seed: int
              ) -> tuple[torch.Tensor, list[dict], int]:
    """Mixed prompt embeddings (B, T, D) of jobs of one class, their metadata records, and how many had k/m lowered.

    Token-stage parts (coarse with coarse_stage='tokens') edit each source's token ids, then ONE text-encoder
    call encodes every edited prompt of the batch; embedding-stage parts (fine; coarse with 'embeds') then
    edit the embeddings. Unedited prompts reuse the class's cached embeddings.
    """
    plans = [_plan_mix(j, ctx, params, seed) for j in jobs]
    embeds = [ctx.embeds[j.source][None] for j in jobs]  # each (1, T, D)
    edited: dict[int, torch.Tensor] = {}  # job position -> its edited token ids (1, T)
    for i, (j, pl) in enumerate(zip(jobs, plans)):
        if "tokens" in pl.stages:
            donor = ctx.tokens[pl.donor][None] if pl.donor is not None else None
            edited[i] = apply_mixing(ctx.tokens[j.source][None], j.op, pl.params, pl.gen, donor=donor,
                                     window=pl.coarse_window, stage="tokens")
    if edited:
        rows = list(edited)
        enc = encode_ids(pipe, torch.cat([edited[i] for i in rows]),
                         torch.stack([ctx.masks[jobs[i].source] for i in rows]))  # (E, T, D)
        for n, i in enumerate(rows):
            embeds[i] = enc[n:n + 1]
    recs = []
    for i, (j, pl) in enumerate(zip(jobs, plans)):
        if "embeds" in pl.stages:
            donor = ctx.embeds[pl.donor][None] if pl.donor is not None else None
            embeds[i] = apply_mixing(embeds[i], j.op, pl.params, pl.gen, donor=donor, window=pl.window, stage="embeds")
        op_p = {**op_params(j.op, pl.params), "window": list(pl.window)}
        if i in edited:
            c0, c1 = pl.coarse_window
            op_p["coarse_window"] = [c0, c1]
            w0, w1 = pl.window
            op_p["mixed_tokens"] = pipe.tokenizer.convert_ids_to_tokens(edited[i][0, w0:w1].tolist())  # the caption now
        if pl.donor is not None:
            op_p["donor_index"], op_p["donor_id"] = pl.donor, ctx.ids[pl.donor]
        recs.append({"file": j.file, "file_name": j.file, "label": j.label, "class_name": j.class_name,
                     "source_id": j.source_id, "source_index": j.source, "variant": j.variant, "op": j.op,
                     "op_params": op_p, "caption": ctx.captions[j.source]})
    return torch.cat(embeds), recs, sum(pl.clamped for pl in plans)


#################################################################################
#                                   Grids                                       #
#################################################################################

def _op_rank(op: str) -> int:
    """Grid column order: coarse variants, then fine ones, then the rest."""
    return 0 if op.startswith("coarse") else 1 if op.startswith("fine") else 2


def write_grids(out: Path, grid_dir: Path, labelled: Any, jobs: Sequence[Job], n_sources: int, ops: Sequence[str],
                summary: dict) -> None:
    """Per class, rows = sources: real | coarse variants | fine variants; to disk and TensorBoard."""
    from PIL import Image

    logger = RunLogger(grid_dir)
    try:
        for label, cjobs in groupby(jobs, key=lambda j: j.label):
            by_src: dict[int, list[Job]] = {}
            for j in cjobs:
                if (out / j.file).is_file():
                    by_src.setdefault(j.source, []).append(j)
            rows = []
            for s, js in list(by_src.items())[:n_sources]:
                ims = [Image.open(out / j.file).convert("RGB") for j in sorted(js, key=lambda j: (_op_rank(j.op), j.variant))]
                real = labelled.load_image(s).convert("RGB").resize(ims[0].size, Image.BICUBIC)
                rows.append([real] + ims)
            if rows:
                name = safe_name(labelled.classes[label])
                logger.image(f"grids/{name}", image_grid(rows), 0, path=grid_dir / f"{name}.png")
        logger.scalars(0, {k: v for k, v in summary.items() if isinstance(v, (int, float)) and v is not None},
                       prefix="generate/")
    finally:
        logger.close()
