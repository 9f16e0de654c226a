"""Synthetic-set generation: the one loop that turns the plan into images, for every `generate.method`.

`generate_synthetic`: the plan (`plan_jobs`), the settings check, resume (only missing images are made),
sharding over processes, one `torch.Generator` per image seeded from (seed, source, variant), the optional
filter or curation, records, grids and a summary. The generator (`mvc.generation.generators`) supplies the
model, the settings that change its images and how a batch of one class is rendered, through the diffusers
pipeline itself. docs/generators.md explains the loop and MVC's batches.
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

from mvc.core.distributed import resolve_dtype
from mvc.core.paths import RunPaths
from mvc.core.perf import channels_last, free_memory_bytes, is_cuda, peak_memory_gb, reset_peak_memory, set_tf32
from mvc.core.utils import MVCError, append_jsonl, atomic_write_json, batched
from mvc.data.captions import load_captions
from mvc.data.synthetic import SyntheticSet, make_record, plan_jobs, shard_jobs, write_grids
from mvc.generation.generators import image_generators, make_generator

log = logging.getLogger(__name__)


#################################################################################
#                                  Filtering                                    #
#################################################################################

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


def generation_settings(cfg: Any, model_dir: Path, labelled: Any, resolution: int, dtype: str = "fp32",
                        groups: Any = None, method: Any = None) -> dict:
    """Everything that changes the images (not the set size, batch size or grids), for `method` (default: the
    generator `generate.method` names); with clustering-based sampling (`groups`) its settings and key too, so
    such a set is never resumed without them (a set made without clustering records no `sampling` key, as
    before it existed)."""
    g = cfg.generate
    method = method if method is not None else make_generator(cfg)
    sampling = {"sampling": {**dataclasses.asdict(cfg.sampling), "key": groups.key}} if groups is not None else {}
    curation = ({"curation": {k: v for k, v in dataclasses.asdict(cfg.curation).items() if k != "max_factor"}}
                if cfg.curation.filters else {})  # how many candidates may be made changes no image
    return {"dtype": dtype, **method.settings(str(model_dir), labelled, resolution),
            "filter_checkpoint": g.filter_checkpoint,
            "filter_threshold": g.filter_threshold if g.filter_checkpoint else None, "seed": cfg.run.seed, **sampling,
            **curation}


#################################################################################
#                                  Generation                                   #
#################################################################################

def generate_synthetic(cfg: Any, *, paths: RunPaths | None = None, labelled: Any = None,
                       captions: dict[str, str] | None = None, pipe: Any = None,
                       predictor: Callable[[list], np.ndarray] | None = None, rank: int = 0, world: int = 1,
                       barrier: Callable[[], None] | None = None, device: Any = None, progress: bool = True,
                       pool: Any = None, method: Any = None, curator: Any = None) -> dict:
    """Make the missing images of this process's share with `generate.method`; the main process (rank 0)
    prepares and merges.

    `paths` (the run's `RunPaths`), `labelled`, `captions`, `pipe`, `predictor`, `pool` (the tiny base's
    pretraining pool) and `curator` default to what the config names (tests inject them); `method`, to the
    generator `generate.method` names (a pre-step passes one it configured, e.g. `DreamBoothGenerator(cfg, groups)`
    with several concepts per class). With curation (`curation.filters`), candidates are made in rounds until each
    class keeps its planned count (`mvc.generation.curation`). With several processes, pass `barrier` (e.g.
    `accelerator.wait_for_everyone`). Returns a summary dict (counts, images/s).
    """
    barrier = barrier or (lambda: None)
    paths = paths if paths is not None else RunPaths.of(cfg)
    method = method if method is not None else make_generator(cfg, paths)
    if pipe is None:  # a dtype the device cannot compute in: refused before any work
        resolve_dtype(cfg.generate.dtype, device if device is not None else "cpu", "generate.dtype")
    out = SyntheticSet(paths.synthetic)
    if labelled is None:
        from mvc.data import load_splits

        labelled, pool, _test = load_splits(cfg.data)
    method.check(labelled)
    g = cfg.generate
    if not plan_jobs(labelled, method.ops(), g.multiplier, g.per_class):  # a class keeps its count whatever the sources
        # e.g. multiplier 0, or so small that every class rounds to no image: refused before any model is built
        raise MVCError(f"generate.multiplier={g.multiplier} plans no synthetic image (it rounds to 0 per class for "
                       f"these {len(labelled)} labelled images); raise it or set generate.per_class")

    # 1. the model, the plan and the settings; the main process records/checks the settings and reconciles
    run, jobs, sources = prepare_run(cfg, method, out, labelled, pool, captions, pipe, predictor, curator, rank, world,
                                     barrier, device, progress)

    # 2. this process's share (with curation: rounds of candidates until every class keeps its planned count)
    t0 = time.perf_counter()
    if run.curator is None:
        run.make([j for j in shard_jobs(jobs, rank, world) if j.file not in out.done()])
    else:
        jobs = curate_rounds(run, jobs, sources, barrier, rank == 0)
    t_end = time.perf_counter()

    # 3. the main process merges every rank's records, then writes grids and a summary
    barrier()
    return finish_run(run, jobs, paths, t_end - t0, t_end - (run.t_render or t0))


def run_generation(cfg: Any, accelerator: Any, paths: RunPaths) -> dict:
    """The generate stage on this process: its share of the set (with `curation.filters`, the selectors are
    trained first: `mvc.generation.curation.train_selectors`)."""
    return generate_synthetic(cfg, paths=paths, rank=accelerator.process_index, world=accelerator.num_processes,
                              barrier=accelerator.wait_for_everyone, device=accelerator.device,
                              progress=accelerator.is_local_main_process)


def prepare_run(cfg: Any, method: Any, out: SyntheticSet, labelled: Any, pool: Any, captions: dict[str, str] | None,
                pipe: Any, predictor: Callable[[list], np.ndarray] | None, curator: Any, rank: int, world: int,
                barrier: Callable[[], None], device: Any, progress: bool) -> tuple["_Run", list, Any]:
    """What the run renders with (model, clusters, resolution, dtype, captions, filter, curator), the plan and the
    settings, checked against the set's (curation reconciles each round against its grown plan instead: the
    candidates beyond the planned count are not stale). Returns (run, plan, the kept sources of clustering)."""
    from mvc.diffusion.inputs import sampling_groups

    g, main = cfg.generate, rank == 0
    # the main process builds what the method samples (the tiny base) and the clusters first, the others then read
    # them; a model trained data-parallel (textual inversion, DreamBooth) trains on every process together
    model = method.shared_model_path(labelled, pool, progress, device, main, barrier)
    if main:
        groups = sampling_groups(cfg, labelled, pool, device, progress)
    barrier()
    if not main:
        groups = sampling_groups(cfg, labelled, pool, device, progress)
    sources = groups.kept_indices() if groups is not None else None
    jobs = plan_jobs(labelled, method.ops(), g.multiplier, g.per_class, sources=sources)
    res = method.resolution(model, pipe)
    dtype = pipe.unet.dtype if pipe is not None else resolve_dtype(g.dtype, device if device is not None else "cpu",
                                                                     "generate.dtype")
    if cfg.curation.filters and curator is None:
        from mvc.generation.curation import build_curator

        curator = build_curator(cfg, labelled, device)
    settings = generation_settings(cfg, Path(model), labelled, res, dtype_name(dtype), groups, method)
    if main:
        settings = out.prepare(settings, labelled.classes)
        if curator is None:
            out.reconcile(jobs)
    barrier()
    if not main:  # checks what the main process recorded (records it only when this rank runs on its own)
        settings = out.prepare(settings, labelled.classes)
    if captions is None and method.needs_captions():  # every process captions its share of what the cache lacks
        captions = load_captions(cfg, labelled, progress, device, rank, world, barrier)
    if predictor is None and g.filter_checkpoint:
        predictor = build_filter(g.filter_checkpoint, labelled.classes)
    run = _Run(cfg, out, method, model, labelled, captions, groups, res, int(settings["seed"]), rank, world, device,
               progress, predictor, curator, pipe, dtype)
    return run, jobs, sources


def dtype_name(dtype: torch.dtype) -> str:
    """The settings' name of a sampling dtype: fp16, bf16 or fp32."""
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")


def finish_run(run: "_Run", jobs: list, paths: RunPaths, seconds: float, render_s: float) -> dict:
    """The run's summary; the main process adds the set's counts and writes grids, summary.json and runs.jsonl."""
    method, device, out, labelled = run.method, run.device, run.out, run.labelled
    summary = {"method": method.name, "rank": run.rank, "world": run.world, "planned": len(jobs), "made": run.made,
               "rejected_now": run.rejected, "resolution": run.res, "dtype": dtype_name(run.dtype),
               "device": str(device if device is not None else "cpu"),
               "seconds": round(seconds, 3), "load_seconds": round(seconds - render_s, 3),
               "images_per_s": round((run.made + run.rejected) / render_s, 4) if render_s > 0 else None,
               "batch_size": method.batch_size, "peak_memory_gb": peak_memory_gb(device) if run.started else None}
    if run.rank == 0:
        counts = out.reconcile(jobs)
        summary.update(images=counts["images"], rejected=counts["rejected"])
        if run.curator is not None:
            summary["curation"] = run.curator.summary(out.root, labelled.classes)
        write_grids(out.root, paths.grids, labelled, jobs, run.cfg.generate.grid_sources, summary)
        atomic_write_json(paths.grids / "summary.json", summary)  # this run
        append_jsonl(paths.grids / "runs.jsonl", summary)  # every run: which processes, device, dtype made the set
    return summary


class _Run:
    """What one generation run renders with, loaded on first use, and its counts."""

    def __init__(self, cfg, out, method, model, labelled, captions, groups, res, seed, rank, world, device,
                 progress, predictor, curator, pipe, dtype):
        self.cfg, self.out, self.method, self.model, self.labelled = cfg, out, method, model, labelled
        self.captions, self.groups, self.res, self.seed = captions, groups, res, seed
        self.rank, self.world, self.device, self.progress = rank, world, device, progress
        self.predictor, self.curator, self.pipe, self.dtype = predictor, curator, pipe, dtype
        self.made = self.rejected = 0
        self.started, self.t_render = False, None

    def _start(self) -> None:
        """Load the pipeline and apply the speed levers (once, on the first job to make)."""
        if self.pipe is None:
            self.pipe = self.method.load(self.model, self.device, self.dtype)
        self.method.batch_size = prepare_pipeline(self.pipe, self.cfg.generate, self.res, self.device)
        self.method.begin(self.pipe, self.model, self.res)
        reset_peak_memory(self.device)
        self.started, self.t_render = True, time.perf_counter()

    def make(self, todo: Sequence[Any]) -> None:
        """Render, judge and write the jobs of `todo` (this process's share, not yet made)."""
        from tqdm.auto import tqdm

        if not todo:
            return
        labelled, g = self.labelled, self.cfg.generate
        if self.method.needs_captions():
            missing = [labelled.ids[j.source] for j in todo if labelled.ids[j.source] not in self.captions]
            if missing:
                raise MVCError(f"no caption for {len(missing)} source image(s), e.g. {missing[0]!r}")
        if not self.started:
            self._start()
        world, rank = self.world, self.rank
        bar = tqdm(total=len(todo), desc=f"generate (rank {rank})" if world > 1 else "generate", unit="img",
                   disable=not self.progress)
        for label, cjobs in groupby(todo, key=lambda j: j.label):
            cjobs = list(cjobs)
            state = self.method.start_class(self.pipe, labelled, label, cjobs, self.captions, self.res)
            for batch in batched(cjobs, self.method.batch_size):
                gens = image_generators(self.seed, batch)
                images, fields = self.method.render(self.pipe, state, batch, self.seed, gens)
                recs = [make_record(j, method=self.method.name, seed=self.seed, generator_seed=gen.initial_seed(),
                                    **self.method.params, **f, **concept_field(self.groups, j)) for j, gen, f in
                        zip(batch, gens, fields)]
                keep = apply_filter(self.predictor, images, batch, recs, len(labelled.classes), g.filter_threshold)
                if self.curator is not None:
                    keep = [k and v for k, v in zip(keep, self.curator.judge(images, batch, recs))]
                for j, im, rec, k in zip(batch, images, recs, keep):
                    if k:
                        self.out.save_image(im, j)
                        self.out.append(rank, rec)  # after the file exists: a record always has its file
                        self.made += 1
                    else:
                        self.out.append(rank, rec, rejected=True)
                        self.rejected += 1
                bar.update(len(batch))
        bar.close()
        self.method.finish()


def curate_rounds(run: _Run, jobs: list, sources: Any, barrier: Callable[[], None], main: bool) -> list:
    """Candidates in rounds (each class's plan grown by its measured keep rate, capped at curation.max_factor x
    its planned count) until every class keeps its planned count; then each class keeps its first planned kept
    images (variant, then source order) and the rest are dropped as surplus, on record. Returns the final plan."""
    from mvc.core.utils import read_jsonl
    from mvc.generation.curation import first_kept, next_targets, read_targets, write_targets

    cfg, out, labelled = run.cfg, run.out, run.labelled
    planned = {c: sum(1 for j in jobs if j.label == c) for c in sorted({j.label for j in jobs})}
    targets = read_targets(out.root, planned)  # a resumed set continues from its largest plan
    while True:
        plan = plan_jobs(labelled, run.method.ops(), sources=sources, totals=targets)
        if main:
            write_targets(out.root, targets)  # before any candidate of this plan exists
            out.reconcile(plan)
        barrier()
        run.make([j for j in shard_jobs(plan, run.rank, run.world) if j.file not in out.done()])
        barrier()
        if main:
            out.reconcile(plan)
        barrier()
        kept = read_jsonl(out.root / "metadata.jsonl")
        made = {c: sum(1 for j in plan if j.label == c) for c in planned}
        grown = next_targets(planned, made, {c: sum(1 for r in kept if r["label"] == c) for c in planned},
                             cfg.curation.max_factor)
        if grown == targets:
            break
        targets = grown
    if main:
        _, surplus = first_kept(kept, planned)
        for r in kept:
            if r["file"] in surplus:  # the record first: a crash in between leaves a file the next run drops again
                out.append(0, {**r, "curation": "surplus"}, rejected=True)
                (out.root / r["file"]).unlink(missing_ok=True)
        short = {labelled.classes[c]: (sum(1 for r in kept if r["label"] == c), n) for c, n in planned.items()
                 if sum(1 for r in kept if r["label"] == c) < n}
        for name, (k, n) in short.items():
            log.warning("curation: class %r keeps %d of its %d planned images after %.1fx candidates "
                        "(curation.max_factor); its rows see fewer synthetic images", name, k, n,
                        cfg.curation.max_factor)
    return plan


#################################################################################
#                        Speed: levers and batch size                           #
#################################################################################

AUTO_BATCH_MAX = 128  # generate.batch_size=null on CUDA: at most this many images per call (H200: +50% 16 -> 128)
MEMORY_SHARE = 0.5   # ... using at most this share of the free memory (the probe is of one image)


def prepare_pipeline(pipe: Any, g: Any, resolution: int, device: Any) -> int:
    """Apply generate.tf32 / channels_last / compile to a loaded pipeline; return the images per call
    (generate.batch_size, or when null as many as free CUDA memory holds, `DEFAULT_BATCH` elsewhere)."""
    from mvc.core.perf import DEFAULT_BATCH

    set_tf32(g.tf32, device)
    channels_last(pipe.unet, g.channels_last)
    size = g.batch_size
    if size is None:
        size = DEFAULT_BATCH
        if is_cuda(device):
            try:  # before compiling: the probe's shapes are not the run's
                size = batch_from_memory(image_memory_bytes(pipe, resolution), free_memory_bytes(device))
            except Exception as e:  # a probe that cannot run must not stop generation
                log.warning("generate.batch_size=null: the memory probe failed (%s: %s); batches of %d",
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "", size)
            log.info("generate.batch_size=null: %d images per pipeline call", size)
    if g.compile:
        pipe.unet.compile()  # in place: the pipeline keeps its U-Net object
    return size


def batch_from_memory(per_image: int, free: int, cap: int = AUTO_BATCH_MAX, share: float = MEMORY_SHARE) -> int:
    """Images per call when one image needs `per_image` bytes and `free` bytes are free: at least 1, at most `cap`."""
    return max(1, min(cap, int(share * free // max(per_image, 1))))


@torch.no_grad()
def image_memory_bytes(pipe: Any, resolution: int, chunks: int = 3) -> int:
    """Peak CUDA bytes one image of a call needs: the larger of a U-Net pass on its guidance rows (`chunks`:
    3 for InstructPix2Pix, 2 for classifier-free guidance) and the VAE decoding its latent."""
    unet, vae = pipe.unet, pipe.vae
    dev, size = unet.device, resolution // int(pipe.vae_scale_factor)
    x = torch.zeros(chunks, unet.config.in_channels, size, size, device=dev, dtype=unet.dtype)
    emb = torch.zeros(chunks, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim, device=dev,
                      dtype=unet.dtype)
    z = torch.zeros(1, vae.config.latent_channels, size, size, device=dev, dtype=vae.dtype)
    peaks = []
    for run in (lambda: unet(x, torch.zeros(chunks, device=dev), encoder_hidden_states=emb),
                lambda: vae.decode(z)):
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        run()
        torch.cuda.synchronize(dev)
        peaks.append(torch.cuda.max_memory_allocated(dev) - base)
    return int(max(peaks))


def concept_field(groups: Any, job: Any) -> dict:
    """The record field of clustering-based sampling: the cluster of the image's source (none without it)."""
    return {} if groups is None else {"cluster": groups.concept_of(job.source).cluster}


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
