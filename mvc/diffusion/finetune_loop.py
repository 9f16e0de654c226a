"""The MVC trainer (train_mvc): InstructPix2Pix fine-tuning of the U-Net on the pairs, a task of the engine.

`run(cfg, accelerator, resume)` is the stage (splits, pairs, captions, prompts, the base, then `finetune`);
`finetune` builds a `FinetuneTask` (caches, trainable weights, optimizer, data order) and hands it to
`mvc.diffusion.engine.train`, which owns the loop. One micro-step is `FinetuneTask.loss`: its global batch's pair
indices, its draws (`draw_step_noise`), the cached inputs (`gather_batch`) and `ip2p_loss` (mvc.diffusion.finetune).
Determinism across resume and process counts, the speed levers and the checkpoint's contents: docs/finetuning.md.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch

from mvc.core import seeds
from mvc.core.distributed import accelerator_settings, broadcast_seed, make_accelerator
from mvc.core.perf import channels_last, compiled, peak_memory_gb, set_tf32
from mvc.core.registry import publish_choices
from mvc.core.utils import MVCError, RunLogger, fingerprint, image_grid
from mvc.diffusion.conditioning import (
    IMAGE_CONDITIONINGS,
    PHOTO_INDEX_TEMPLATE,
    SHAPE,
    ImageContexts,
    ShapeControlledUNet,
    build_controlnet,
    photo_index_captions,
    shape_maps,
)
from mvc.diffusion.engine import Cadence, Task, train
from mvc.diffusion.finetune import (
    CACHE_DTYPES,
    GlobalBatchSampler,
    draw_step_noise,
    encode_latents_cache,
    encode_prompts_cache,
    gather_batch,
    ip2p_loss,
)
from mvc.diffusion.finetune_setup import (
    build_adam,
    build_ema,
    build_lr_scheduler,
    freeze,
    load_trainable_state_dict,
    needs_checkpointing,
    optimizer_state_bytes,
    prepare_unet,
    set_attention,
    trainable_state_dict,
)
from mvc.diffusion.inputs import base_source, load_base, sampling_groups
from mvc.diffusion.models import ip2p_pipeline, save_ip2p_folder, vae_scale_factor
from mvc.diffusion.sd_io import images_to_tensor, resize

log = logging.getLogger(__name__)

PROMPT_FROM = ("target", "condition")  # whose caption a pair's prompt uses
publish_choices("prompt source", PROMPT_FROM)
# train.* keys a resumed run may change without changing what it learns (max_steps: train longer)
RESUME_FREE_KEYS = {"max_steps", "checkpoint_every", "checkpoints_keep", "validate_every", "num_validation",
                    "validation_steps", "validation_guidance_scale", "validation_image_guidance_scale", "log_every",
                    "gradient_checkpointing", "attention", "channels_last", "compile", "tf32", "ema_foreach"}


#################################################################################
#                                  Validation                                   #
#################################################################################

def validation_indices(num_pairs: int, k: int) -> np.ndarray:
    """k pair indices spread evenly over the pair list (pairs are grouped by class)."""
    return np.unique(np.linspace(0, num_pairs - 1, min(k, num_pairs)).round().astype(int))


@torch.no_grad()
def validation_grid(components: dict, unet, dataset, pairs, prompts: list[str], train_cfg, seed: int, ema=None,
                    images=None, shapes: torch.Tensor | None = None):
    """One row per validation pair: condition | generated (IP2P pipeline; the EMA weights when kept) | target.
    With `images` (`ImageContexts`), each pair's image context stands in for its prompt; with `shapes` (the
    uint8 edge-map cache of a U-Net with a ControlNet branch), the condition images' maps, as generation gives the
    sources'."""
    sel = validation_indices(len(pairs.cond), train_cfg.num_validation)
    res = train_cfg.resolution
    conds = [resize(dataset[int(pairs.cond[i])][0], res) for i in sel]
    tgts = [resize(dataset[int(pairs.target[i])][0], res) for i in sel]
    src = pairs.target if train_cfg.prompt_from == "target" else pairs.cond
    params = [p for p in unet.parameters() if p.requires_grad]
    was_training = unet.training
    unet.eval()
    if ema is not None:  # validate what will be saved: the averaged weights
        ema.store(params)
        ema.copy_to(params)
    cond_ids = torch.as_tensor(np.asarray(pairs.cond)[sel], dtype=torch.long)  # (K,) the selected pairs' images
    if images is None:
        text = {"prompt": [prompts[int(src[i])] for i in sel]}
    else:
        target_ids = torch.as_tensor(np.asarray(pairs.target)[sel], dtype=torch.long)
        emb = images.lookup(cond_ids, target_ids, torch.zeros(len(sel), dtype=torch.long)).to(unet.device, unet.dtype)
        text = {"prompt_embeds": emb, "negative_prompt_embeds": images.empty[None].expand(len(sel), -1, -1).to(emb)}
    if shapes is not None:
        unet.shape = shapes[cond_ids, 0].float() / 255.0
    try:
        gen = ip2p_pipeline(components, unet)(
            **text, image=conds, num_inference_steps=train_cfg.validation_steps,
            guidance_scale=train_cfg.validation_guidance_scale,
            image_guidance_scale=train_cfg.validation_image_guidance_scale,
            generator=seeds.generator(seed, "finetune.validation")).images
    finally:
        if ema is not None:
            ema.restore(params)
        if shapes is not None:
            unet.shape = None
        unet.train(was_training)
    return image_grid([[c, g, t] for c, g, t in zip(conds, gen, tgts)])


#################################################################################
#                        The task: what fine-tuning adds to the engine          #
#################################################################################

def finetune_trained_on(cfg, dataset, cond: torch.Tensor, target: torch.Tensor, prompts: list[str], seed: int) -> dict:
    """What a fine-tuning run's weights depend on (recorded in its checkpoints; a resume must match it):
    the labelled subset, the pairs, the prompts (captioner and template), the base, the seed and the
    train.* keys that change the result (all but `RESUME_FREE_KEYS`)."""
    rec = {"data": dataset.fingerprint(), "pairs": fingerprint(cond.numpy(), target.numpy()),
           "prompts": fingerprint(prompts), "run.seed": int(seed),
           **{f"model.{k}": v for k, v in dataclasses.asdict(cfg.model).items()},
           **{f"train.{k}": v for k, v in dataclasses.asdict(cfg.train).items()
              if k not in RESUME_FREE_KEYS and not (k == "conditioning" and v == "caption")}}  # as before the key
    if cfg.model.base == "tiny":  # the settings of its key: where and how often the base saves change no weight
        from mvc.diffusion.tiny import NOT_IN_KEY

        rec.update({f"tiny.{k}": v for k, v in dataclasses.asdict(cfg.tiny).items() if k not in NOT_IN_KEY})
    return rec


class FinetuneTask(Task):
    """InstructPix2Pix fine-tuning of components['unet'] (8 input channels) on the pairs, for `engine.train`.

    Each optimizer step is `accelerator.gradient_accumulation_steps` micro-steps of the global batch B; every process
    draws the same global batch (pair order, the micro-step's draws) and keeps its contiguous rows; its loss is
    sum(per-sample loss) * world / B, so DDP's gradient average is the global batch's mean."""
    kind, label, prefix, step_role = "finetune", "fine-tuning", "train/", "finetune.step"
    nonfinite_fix = "lower train.lr, use train.mixed_precision=no, or resume from an earlier checkpoint"
    accumulates = True

    def __init__(self, cfg, components: dict, dataset, pairs, prompts: list[str], acc, seed: int, out_dir: Path,
                 final_dir: Path, source: str | None):
        self.cfg, self.tc, self.acc, self.seed = cfg, cfg.train, acc, seed
        self.components, self.dataset, self.pairs, self.prompts = components, dataset, pairs, prompts
        self.out_dir, self.final_dir, self.source = out_dir, final_dir, source
        self.sched = components["scheduler"]
        self._check_inputs()
        self._build_caches()
        self._build_weights()
        self.record = finetune_trained_on(cfg, dataset, self.cond, self.target, prompts, seed)
        world, B = acc.num_processes, self.tc.batch_size
        shard = torch.tensor_split(torch.arange(B), world)[acc.process_index]
        self.rows = slice(int(shard[0]), int(shard[-1]) + 1)  # this process's rows of the global batch
        self.weight = world / B  # DDP averages over processes -> exact global-batch mean
        self.accum = int(acc.gradient_accumulation_steps)
        self.images_per_step = B

    def _check_inputs(self) -> None:
        """Refuse a U-Net without the condition channels, prompts or pairs that do not fit the subset, a batch
        smaller than the process count; keep the pair indices as tensors."""
        unet, vae, tc = self.components["unet"], self.components["vae"], self.tc
        if unet.config.in_channels != 2 * vae.config.latent_channels:
            raise MVCError(f"the U-Net takes {unet.config.in_channels} input channels; InstructPix2Pix needs "
                           f"{2 * vae.config.latent_channels} (widen conv_in first)")
        self.cond = torch.as_tensor(np.asarray(self.pairs.cond), dtype=torch.long)
        self.target = torch.as_tensor(np.asarray(self.pairs.target), dtype=torch.long)
        if len(self.prompts) != len(self.dataset):
            raise MVCError(f"{len(self.prompts)} prompts for {len(self.dataset)} images; need one prompt per labelled "
                           "image")
        if len(self.cond) and int(max(self.cond.max(), self.target.max())) >= len(self.dataset):
            raise MVCError("pair indices point outside the labelled subset; delete pairs.npz and rerun")
        self.prompt_src = self.target if tc.prompt_from == "target" else self.cond
        if tc.conditioning == SHAPE and tc.lora_rank > 0:
            raise MVCError("train.conditioning=caption_shape trains its ControlNet branch fully beside the U-Net; "
                           "set train.lora_rank=0")
        if tc.batch_size < self.acc.num_processes:
            raise MVCError(f"train.batch_size={tc.batch_size} is smaller than the {self.acc.num_processes} processes; "
                           "raise it")

    def _build_caches(self) -> None:
        """One-off caches in CPU memory: VAE posteriors of every labelled image, text embeddings of every distinct
        prompt (in the U-Net's compute dtype); each micro-step moves only its rows to the device."""
        acc, tc, comps = self.acc, self.tc, self.components
        freeze(comps["vae"], comps["text_encoder"])
        comps["vae"].to(acc.device)
        comps["text_encoder"].to(acc.device)
        t0 = time.perf_counter()
        self.latents = encode_latents_cache(comps["vae"], self.dataset, tc.resolution, flip=tc.random_flip,
                                            show_progress=acc.is_main_process)
        self.text = encode_prompts_cache(comps["tokenizer"], comps["text_encoder"], self.prompts,
                                         show_progress=acc.is_main_process,
                                         dtype=CACHE_DTYPES.get(str(acc.mixed_precision), torch.float32))
        self.images = None  # image conditionings: each pair's context from its images' embeddings
        if tc.conditioning in IMAGE_CONDITIONINGS:
            self.images = ImageContexts.build(self.latents.mean, self.latents.scaling_factor, self.text.empty,
                                              direction=tc.conditioning == "image_direction")
        self.shapes = shape_cache(self.dataset, tc.resolution, tc.random_flip) if tc.conditioning == SHAPE else None
        self.cache_s = time.perf_counter() - t0
        lat, text = self.latents, self.text
        if acc.is_main_process:
            log.info("caches in CPU memory (per process): latents %s %s = %.2f GB; text embeddings of %d distinct "
                     "prompts (of %d) %s %s = %.2f GB; training with %s", tuple(lat.mean.shape), lat.mean.dtype,
                     lat.nbytes / 1e9, len(text.table), len(self.prompts), tuple(text.table.shape), text.table.dtype,
                     text.nbytes / 1e9, ", ".join(f"{k} {v}" for k, v in accelerator_settings(acc).items()))

    def _build_weights(self) -> None:
        """Trainable weights (memory format, checkpointing), optimizer, schedule, EMA, data order."""
        acc, tc, unet = self.acc, self.tc, self.components["unet"]
        set_tf32(tc.tf32, acc.device)
        self.params = prepare_unet(unet, tc)
        if tc.conditioning == SHAPE:  # the ControlNet branch, copied from the U-Net, trains beside it
            net = build_controlnet(unet, vae_scale_factor(self.components["vae"]))
            set_attention(net, tc.attention)
            if tc.gradient_checkpointing:
                net.enable_gradient_checkpointing()
            net.requires_grad_(True)
            net.train()
            self.params += list(net.parameters())
            unet = self.components["unet"] = ShapeControlledUNet(unet, net, vae_scale_factor(self.components["vae"]))
        unet.to(acc.device)  # before the EMA copies its weights, so they live on the same device
        channels_last(unet, tc.channels_last)
        self.memory = choose_checkpointing(acc, unet, tc, self.params, -(-tc.batch_size // acc.num_processes),
                                           tuple(self.latents.mean.shape[3:]), tuple(self.text.empty.shape),
                                           self.text.table.dtype)
        self.optimizer = build_adam(self.params, tc)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, tc)
        self.ema = build_ema(self.params, tc.ema_decay, tc.ema_foreach) if tc.use_ema else None
        self.max_grad_norm = tc.max_grad_norm if tc.max_grad_norm > 0 else float("inf")
        self.sampler = GlobalBatchSampler(len(self.cond), seeds.generator(self.seed, "finetune.order"))

    def models(self) -> list:
        return [self.components["unet"]]

    def set_prepared(self, models: list) -> None:
        self.unet = models[0]
        self.bare = self.acc.unwrap_model(self.unet)
        self.step_unet = compiled(self.unet, self.tc.compile)  # the step's forward; validation and export: `bare`

    def draw_index(self, step: int, micro: int) -> tuple[int, ...]:
        return (step, micro)

    def restore(self, ckpt: dict | None) -> None:
        if ckpt is None:
            return
        load_trainable_state_dict(self.components["unet"], ckpt["unet"])
        self.sampler.load_state_dict(ckpt["sampler"])
        if self.ema is not None:
            if ckpt.get("ema") is None:
                raise MVCError("train.use_ema=true but the checkpoint has no EMA; resume with the same config")
            self.ema.load_state_dict(ckpt["ema"])
            self.ema.to(self.acc.device)
        if self.acc.is_main_process:
            log.info("resumed from step %d", int(ckpt["step"]))

    def state(self) -> dict:
        return {"unet": trainable_state_dict(self.bare), "ema": self.ema.state_dict() if self.ema else None,
                "sampler": self.sampler.state_dict()}

    def loss(self, step: int, micro: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro-step: this process's rows of the next global batch, its draws, the IP2P loss."""
        tc, B, dev = self.tc, self.tc.batch_size, self.acc.device
        idx = self.sampler.next(B)[self.rows]
        rnd = draw_step_noise(B, tuple(self.latents.mean.shape[2:]), self.sched.config.num_train_timesteps,
                              tc.random_flip, tc.drop_text_prob, tc.drop_image_prob, tc.drop_both_prob,
                              generator).rows(self.rows)
        batch = gather_batch(self.latents, self.text, self.cond[idx], self.target[idx], self.prompt_src[idx],
                             rnd, self.images, self.shapes)  # CPU rows
        batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
        rnd = rnd.to(dev)
        per_sample = ip2p_loss(self.step_unet, self.sched, **batch, noise=rnd.noise, timesteps=rnd.timesteps)  # (b,)
        local_sum = per_sample.sum()
        record = self.acc.reduce(local_sum.detach().clone(), reduction="sum") / (B * self.accum)
        return local_sum * self.weight, record

    def setup_scalars(self) -> dict:
        return {"cache_seconds": self.cache_s, "world_size": self.acc.num_processes, "seed": self.seed,
                "grad_accum": self.accum, "latent_cache_gb": self.latents.nbytes / 1e9,
                "text_cache_gb": self.text.nbytes / 1e9,
                **{k: float(v) for k, v in self.memory.items() if v is not None}}

    def validate(self, step: int, logger: RunLogger) -> None:
        grid = validation_grid(self.components, self.bare, self.dataset, self.pairs, self.prompts, self.tc, self.seed,
                               self.ema, self.images, self.shapes)
        logger.image("validation", grid, step, path=self.out_dir / "validation" / f"step-{step:06d}.png")

    def export(self, step: int, result: dict) -> None:
        """The diffusers folder generation loads (EMA weights when kept, LoRA merged)."""
        cfg, tc = self.cfg, self.tc
        save_ip2p_folder(self.final_dir, self.components, self.bare, ema=self.ema, training={
            "resolution": tc.resolution, "vae_scale_factor": vae_scale_factor(self.components["vae"]), "steps": step,
            "base": cfg.model.base, "base_source": self.source or cfg.model.base,
            "prompt_template": PHOTO_INDEX_TEMPLATE if tc.conditioning == "photo_index" else cfg.captions.prompt_template,
            "captioner": cfg.captions.captioner, "ema": self.ema is not None, "lora_rank": tc.lora_rank,
            "conditioning": tc.conditioning, **({"image_grid": self.images.grid} if self.images is not None else {})})


def shape_cache(dataset, resolution: int, flip: bool, batch_size: int = 64) -> torch.Tensor:
    """Edge maps (N, F, 1, R, R) uint8 of every image (`shape_maps`), both orientations if `flip`."""
    out = []
    for start in range(0, len(dataset), batch_size):
        x = images_to_tensor([dataset[i][0] for i in range(start, min(start + batch_size, len(dataset)))], resolution)
        m = shape_maps(x)  # (b, 1, R, R)
        views = [m, torch.flip(m, dims=[3])] if flip else [m]
        out.append((torch.stack(views, 1) * 255).round().to(torch.uint8))
    return torch.cat(out)


def finetune(cfg, components: dict, dataset, pairs, prompts: list[str], out_dir: str | Path,
             resume: str | None = None, accelerator=None, final_dir: str | Path | None = None,
             source: str | None = None) -> dict:
    """Fine-tune components['unet'] (8 input channels) on the pairs; write checkpoints, logs, final folder.

    `source` (the folder or hub id the components came from) is recorded in mvc_training.json.

    `prompts[i]` is the prompt of image i of `dataset`; a pair uses its target's (or condition's) prompt.
    Returns {"losses": per-step global losses of this run, "step", "final_dir", "images_per_s", ...}.
    """
    tc = cfg.train
    acc = accelerator if accelerator is not None else make_accelerator(tc.mixed_precision, tc.grad_accum)
    seed = broadcast_seed(acc, cfg.run.seed)
    seeds.seed_everything(seeds.derive_seed(seed, "process", acc.process_index))  # for randomness inside the model
    out_dir = Path(out_dir)
    final_dir = Path(final_dir) if final_dir is not None else out_dir / "final"
    task = FinetuneTask(cfg, components, dataset, pairs, prompts, acc, seed, out_dir, final_dir, source)
    cadence = Cadence(tc.max_steps, tc.log_every, tc.checkpoint_every, tc.checkpoints_keep, tc.validate_every)
    res = train(task, acc, out_dir, cadence, dataclasses.asdict(cfg), task.record, resume=resume, fresh_ok=False)
    return {**res, "final_dir": final_dir, "cache_seconds": task.cache_s, "mixed_precision": str(acc.mixed_precision),
            "latent_cache_bytes": task.latents.nbytes, "text_cache_bytes": task.text.nbytes,
            "gradient_checkpointing": task.memory["gradient_checkpointing"],
            "peak_memory_gb": peak_memory_gb(acc.device)}


def choose_checkpointing(acc, unet, tc, params, rows: int, latent_size: tuple[int, ...], text_shape: tuple[int, int],
                         text_dtype: torch.dtype) -> dict:
    """Gradient checkpointing as train.gradient_checkpointing says; null: on when the memory probe of a step of
    `rows` rows (this process's share, rounded up) says it would not fit without, on any process."""
    if tc.gradient_checkpointing is not None:
        return {"gradient_checkpointing": bool(tc.gradient_checkpointing)}  # prepare_unet applied it
    out = needs_checkpointing(unet, acc.device, acc.autocast, rows, latent_size, text_shape, text_dtype,
                              optimizer_state_bytes(params, tc, acc.num_processes))
    if acc.num_processes > 1:  # one choice for every process: on when any needs it
        flag = torch.tensor(float(out["gradient_checkpointing"]), device=acc.device)
        out["gradient_checkpointing"] = bool(acc.reduce(flag, reduction="sum").item() > 0)
    if out["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
    if acc.is_main_process:
        log.info("gradient checkpointing %s (train.gradient_checkpointing=null; %s)",
                 "on" if out["gradient_checkpointing"] else "off",
                 ", ".join(f"{k} {v}" for k, v in out.items() if k != "gradient_checkpointing") or "not on CUDA")
    return out


#################################################################################
#                               Stage flow (main)                               #
#################################################################################

def _pairs_for(cfg, labelled, path: Path, main: bool, groups=None):
    """Pairs of the labelled subset: loaded from `path` when drawn from this subset with these settings,
    else drawn and saved (pairs are derived data, so a stale file is replaced with a warning). With
    `groups` (clustering-based sampling's `ConceptGroups`), pairs are drawn within each kept cluster."""
    from mvc.data.pairs import build_pairs, grouping_fingerprint, load_pairs, save_pairs

    ids = groups.group_ids() if groups is not None else None
    if path.is_file():
        try:
            return load_pairs(path, labelled.fingerprint(), rounds=cfg.pairs.rounds, seed=cfg.pairs.seed,
                              grouping=grouping_fingerprint(ids))
        except MVCError as e:
            log.warning("%s; drawing new pairs", e)
    pairs = build_pairs(labelled, cfg.pairs.rounds, cfg.pairs.seed, cfg.data.on_small_class, groups=ids)
    if main:
        save_pairs(path, pairs)
    return pairs


def stage_captions(cfg, labelled, acc) -> tuple[dict[str, str] | None, str]:
    """The captions and prompt template of `train.conditioning`: the captioner's (caption), each image's number in
    its class (photo_index), none (the image conditionings)."""
    c = cfg.train.conditioning
    if c == "photo_index":
        return photo_index_captions(labelled), PHOTO_INDEX_TEMPLATE
    if c in IMAGE_CONDITIONINGS:
        return None, ""
    from mvc.data.captions import load_captions

    return load_captions(cfg, labelled, acc.is_main_process, acc.device, acc.process_index, acc.num_processes,
                         acc.wait_for_everyone), cfg.captions.prompt_template


def run(cfg, accelerator, resume: str | None = None) -> dict:
    """The train_mvc stage: splits -> (clusters) -> pairs -> captions -> prompts -> base -> widen conv_in -> train
    -> final."""
    from mvc.core.paths import RunPaths
    from mvc.data import load_splits
    from mvc.data.prompts import make_prompt
    from mvc.diffusion.models import widen_conv_in

    acc, paths = accelerator, RunPaths.of(cfg)
    # Process 0 does any download / base building first; the others then read its caches. Captioning is
    # sharded: every process captions its share of what the cache lacks.
    with acc.main_process_first():
        labelled, pool, _test = load_splits(cfg.data)
        groups = sampling_groups(cfg, labelled, pool, acc.device, progress=acc.is_main_process)
        pairs = _pairs_for(cfg, labelled, paths.pairs, acc.is_main_process, groups)
    captions, template = stage_captions(cfg, labelled, acc)
    with acc.main_process_first():
        source = base_source(cfg, pool, paths.root, acc.is_main_process, acc.device, str(acc.mixed_precision))
        components = load_base(cfg, pool, paths.root, source=source)
    prompts = [make_prompt(template, captions[i], labelled.classes[int(t)]) if captions else ""
               for i, t in zip(labelled.ids, labelled.targets)]  # image conditionings read no prompt
    components["unet"] = widen_conv_in(components["unet"])
    return finetune(cfg, components, labelled, pairs, prompts, paths.mvc, resume=resume, accelerator=acc,
                    source=source)
