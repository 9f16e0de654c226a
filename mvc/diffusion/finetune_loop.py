"""The fine-tuning loop (accelerate) and the train_mvc stage flow `main(cfg, resume)`.

Determinism across resume and across process counts, by construction:
- the data order is defined on the GLOBAL batch: `GlobalBatchSampler` draws permutations of the pair
  indices from its own generator (saved in checkpoints) and every process draws the same global
  batch, then keeps its contiguous shard of rows;
- every other random draw of a micro-step (timesteps, noises, flips, dropout) is drawn for the whole
  global batch from its own generator (`seeds.generator(seed, "finetune.step", step, micro)`) and
  sharded the same way;
- each process's loss is sum(per-sample loss) * world / global_batch, so DDP's gradient averaging
  gives exactly the gradient of the global-batch mean (uneven shards included);
- the LR schedule is stepped once per optimizer step by us (accelerate's prepared scheduler would
  step once per process); an optimizer step is `accelerator.gradient_accumulation_steps` micro-steps
  (train.grad_accum, or accelerate's own setting when that is null), so steps, optimizer updates and
  the schedule always agree.
The global RNGs are seeded per process (role "process", index rank) for any randomness inside the model.

Speed (docs in mvc.core.config's train keys): no host sync per step -- each step's loss and gradient norm stay
on the device (`PendingSteps`) and are read, and checked for non-finite values, only at the logging
cadence and before any validation, checkpoint or export, so a run that went non-finite stops before it
writes weights; gradient checkpointing only when a probe says the step would not fit without
(`train.gradient_checkpointing=null`); optional channels-last, torch.compile of the training step, TF32,
and the multi-tensor EMA update.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mvc.core import seeds
from mvc.core.checkpoint import resolve_resume, rng_state, save_checkpoint, set_rng_state
from mvc.core.distributed import accelerator_settings, broadcast_seed, make_accelerator
from mvc.core.perf import channels_last, compiled, peak_memory_gb, reset_peak_memory, set_tf32
from mvc.core.registry import publish_choices
from mvc.core.utils import MVCError, RunLogger, fingerprint, image_grid
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
    build_ema,
    build_lr_scheduler,
    build_optimizer,
    freeze,
    load_trainable_state_dict,
    needs_checkpointing,
    optimizer_state_bytes,
    prepare_unet,
    trainable_state_dict,
)
from mvc.diffusion.inputs import base_source, load_base, sampling_groups
from mvc.diffusion.models import ip2p_pipeline, save_ip2p_folder, vae_scale_factor
from mvc.diffusion.sd_io import resize

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
def validation_grid(components: dict, unet, dataset, pairs, prompts: list[str], train_cfg, seed: int, ema=None):
    """One row per validation pair: condition | generated (IP2P pipeline; the EMA weights when kept) | target."""
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
    try:
        gen = ip2p_pipeline(components, unet)(
            prompt=[prompts[int(src[i])] for i in sel], image=conds, num_inference_steps=train_cfg.validation_steps,
            guidance_scale=train_cfg.validation_guidance_scale,
            image_guidance_scale=train_cfg.validation_image_guidance_scale,
            generator=seeds.generator(seed, "finetune.validation")).images
    finally:
        if ema is not None:
            ema.restore(params)
        unet.train(was_training)
    return image_grid([[c, g, t] for c, g, t in zip(conds, gen, tgts)])


#################################################################################
#                        Per-step values, read at sync points                   #
#################################################################################

class PendingSteps:
    """Losses and gradient norms of the steps since the last sync point, kept as device tensors (reading a
    value waits for the accelerator, which then idles while the host prepares the next step)."""

    def __init__(self, step: int):
        self.step, self.losses, self.norm = step, [], None
        self.images, self.t0 = 0, time.perf_counter()

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor | None, images: int) -> None:
        """One optimizer step: its global loss (a 0-d tensor), its gradient norm (None: not computed)."""
        self.losses.append(loss.detach())
        self.norm = grad_norm.detach() if grad_norm is not None else self.norm
        self.images += images

    def flush(self) -> tuple[list[float], float, float]:
        """(losses, last gradient norm, images/s since the last flush), read in one sync; MVCError at the first
        non-finite loss, before anything is written from the weights it produced."""
        if not self.losses:
            return [], float("nan"), float("nan")
        vals = torch.stack(self.losses).float().cpu().tolist()  # the one host sync of the interval
        norm = float(self.norm) if self.norm is not None else float("nan")
        elapsed = time.perf_counter() - self.t0
        for i, v in enumerate(vals):
            if not math.isfinite(v):
                raise MVCError(f"non-finite loss ({v}) at step {self.step + i + 1}; lower train.lr, use "
                               "train.mixed_precision=no, or resume from an earlier checkpoint")
        ips = self.images / elapsed if elapsed > 0 else float("nan")
        self.step += len(vals)
        self.losses, self.images, self.t0 = [], 0, time.perf_counter()
        return vals, norm, ips


#################################################################################
#                                 Training loop                                 #
#################################################################################

def resume_record(cfg, dataset, cond: torch.Tensor, target: torch.Tensor, prompts: list[str], seed: int) -> dict:
    """What a fine-tuning run's weights depend on (recorded in its checkpoints; a resume must match it):
    the labelled subset, the pairs, the prompts (captioner and template), the base, the seed and the
    train.* keys that change the result."""
    rec = {"data": dataset.fingerprint(), "pairs": fingerprint(cond.numpy(), target.numpy()),
           "prompts": fingerprint(prompts), "run.seed": int(seed),
           **{f"model.{k}": v for k, v in dataclasses.asdict(cfg.model).items()},
           **{f"train.{k}": v for k, v in dataclasses.asdict(cfg.train).items() if k not in RESUME_FREE_KEYS}}
    if cfg.model.base == "tiny":  # the settings of its key: where and how often the base saves change no weight
        from mvc.diffusion.tiny import NOT_IN_KEY

        rec.update({f"tiny.{k}": v for k, v in dataclasses.asdict(cfg.tiny).items() if k not in NOT_IN_KEY})
    return rec


def finetune(cfg, components: dict, dataset, pairs, prompts: list[str], out_dir: str | Path,
             resume: str | None = None, accelerator=None, final_dir: str | Path | None = None,
             source: str | None = None) -> dict:
    """Fine-tune components['unet'] (8 input channels) on the pairs; write checkpoints, logs, final folder.

    `source` (the folder or hub id the components came from) is recorded in mvc_training.json.

    `prompts[i]` is the prompt of image i of `dataset`; a pair uses its target's (or condition's) prompt.
    Returns {"losses": per-step global losses of this run, "step", "final_dir", "images_per_s"}.
    """
    tc = cfg.train
    acc = accelerator if accelerator is not None else make_accelerator(tc.mixed_precision, tc.grad_accum)
    world, rank, main = acc.num_processes, acc.process_index, acc.is_main_process
    seed = broadcast_seed(acc, cfg.run.seed)
    seeds.seed_everything(seeds.derive_seed(seed, "process", rank))
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    unet, vae, text_encoder, tokenizer, sched = (components[k] for k in
                                                 ("unet", "vae", "text_encoder", "tokenizer", "scheduler"))
    if unet.config.in_channels != 2 * vae.config.latent_channels:
        raise MVCError(f"the U-Net takes {unet.config.in_channels} input channels; InstructPix2Pix needs "
                       f"{2 * vae.config.latent_channels} (widen conv_in first)")
    cond_all = torch.as_tensor(np.asarray(pairs.cond), dtype=torch.long)
    tgt_all = torch.as_tensor(np.asarray(pairs.target), dtype=torch.long)
    if len(prompts) != len(dataset):
        raise MVCError(f"{len(prompts)} prompts for {len(dataset)} images; need one prompt per labelled image")
    if len(cond_all) and int(max(cond_all.max(), tgt_all.max())) >= len(dataset):
        raise MVCError("pair indices point outside the labelled subset; delete pairs.npz and rerun")
    prompt_src = tgt_all if tc.prompt_from == "target" else cond_all
    B = tc.batch_size
    if B < world:
        raise MVCError(f"train.batch_size={B} is smaller than the {world} processes; raise it")

    # 1. One-off caches in CPU memory: VAE posteriors of every labelled image, text embeddings of every
    #    distinct prompt (in the U-Net's compute dtype); each micro-step moves only its rows to the device.
    freeze(vae, text_encoder)
    vae.to(acc.device)
    text_encoder.to(acc.device)
    t0 = time.perf_counter()
    latents = encode_latents_cache(vae, dataset, tc.resolution, flip=tc.random_flip, show_progress=main)
    text = encode_prompts_cache(tokenizer, text_encoder, prompts, show_progress=main,
                                dtype=CACHE_DTYPES.get(str(acc.mixed_precision), torch.float32))
    cache_s = time.perf_counter() - t0
    if main:
        log.info("caches in CPU memory (per process): latents %s %s = %.2f GB; text embeddings of %d distinct "
                 "prompts (of %d) %s %s = %.2f GB; training with %s", tuple(latents.mean.shape), latents.mean.dtype,
                 latents.nbytes / 1e9, len(text.table), len(prompts), tuple(text.table.shape), text.table.dtype,
                 text.nbytes / 1e9, ", ".join(f"{k} {v}" for k, v in accelerator_settings(acc).items()))

    # 2. Trainable weights (memory format, checkpointing), optimizer, schedule, EMA, data order.
    set_tf32(tc.tf32, acc.device)
    params = prepare_unet(unet, tc)
    unet.to(acc.device)  # before the EMA copies its weights, so they live on the same device
    channels_last(unet, tc.channels_last)
    memory = choose_checkpointing(acc, unet, tc, params, -(-B // world), tuple(latents.mean.shape[3:]),
                                  tuple(text.empty.shape), text.table.dtype)
    optimizer = build_optimizer(params, tc)
    lr_sched = build_lr_scheduler(optimizer, tc)
    ema = build_ema(params, tc.ema_decay, tc.ema_foreach) if tc.use_ema else None
    sampler = GlobalBatchSampler(len(cond_all), seeds.generator(seed, "finetune.order"))
    step = 0
    record = resume_record(cfg, dataset, cond_all, tgt_all, prompts, seed)
    ckpt = resolve_resume(resume, ckpt_dir, kind="finetune", trained_on=record, fresh_ok=False)
    if ckpt is not None:
        load_trainable_state_dict(unet, ckpt["unet"])
        lr_sched.load_state_dict(ckpt["lr_scheduler"])
        sampler.load_state_dict(ckpt["sampler"])
        if ema is not None:
            if ckpt.get("ema") is None:
                raise MVCError("train.use_ema=true but the checkpoint has no EMA; resume with the same config")
            ema.load_state_dict(ckpt["ema"])
            ema.to(acc.device)
        step = int(ckpt["step"])
        if world == 1 and ckpt.get("world_size") == 1:
            set_rng_state(ckpt["rng"])
    unet, optimizer = acc.prepare(unet, optimizer)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        if main:
            log.info("resumed from step %d", step)
    bare = acc.unwrap_model(unet)
    step_unet = compiled(unet, tc.compile)  # the training step's forward; validation and export use `bare`

    # 3. Loop: each optimizer step = `accum` micro-steps of the global batch B.
    accum = int(acc.gradient_accumulation_steps)
    logger = RunLogger(out_dir, enabled=main, truncate_to=step if ckpt is not None else -1)  # no replayed records
    logger.config(dataclasses.asdict(cfg), metrics=["train/loss"])
    if main:
        logger.scalars(step, {"cache_seconds": cache_s, "world_size": world, "seed": seed, "grad_accum": accum,
                              "latent_cache_gb": latents.nbytes / 1e9, "text_cache_gb": text.nbytes / 1e9,
                              **{k: float(v) for k, v in memory.items() if v is not None}}, prefix="setup/")
    shard = torch.tensor_split(torch.arange(B), world)[rank]
    rows = slice(int(shard[0]), int(shard[-1]) + 1)
    weight = world / B  # DDP averages over processes -> exact global-batch mean
    latent_shape = tuple(latents.mean.shape[2:])
    ttimesteps = sched.config.num_train_timesteps
    losses: list[float] = []
    ips = float("nan")
    pending = PendingSteps(step)
    reset_peak_memory(acc.device)
    pbar = tqdm(total=tc.max_steps, initial=step, desc="fine-tuning", disable=not main)
    while step < tc.max_steps:
        step_loss, grad_norm = torch.zeros((), device=acc.device), None
        for micro in range(accum):
            idx = sampler.next(B)[rows]
            rnd = draw_step_noise(B, latent_shape, ttimesteps, tc.random_flip, tc.drop_text_prob,
                                  tc.drop_image_prob, tc.drop_both_prob,
                                  seeds.generator(seed, "finetune.step", step, micro)).rows(rows)
            batch = gather_batch(latents, text, cond_all[idx], tgt_all[idx], prompt_src[idx], rnd)  # CPU rows
            batch = {k: v.to(acc.device, non_blocking=True) for k, v in batch.items()}
            rnd = rnd.to(acc.device)
            with acc.accumulate(unet):
                per_sample = ip2p_loss(step_unet, sched, **batch, noise=rnd.noise, timesteps=rnd.timesteps)  # (b,)
                local_sum = per_sample.sum()
                step_loss += acc.reduce(local_sum.detach().clone(), reduction="sum") / (B * accum)
                acc.backward(local_sum * weight)
                if acc.sync_gradients:
                    max_norm = tc.max_grad_norm if tc.max_grad_norm > 0 else float("inf")
                    grad_norm = acc.clip_grad_norm_(params, max_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        if not optimizer.step_was_skipped:
            lr_sched.step()
        if ema is not None:
            ema.step(params)
        step += 1
        pending.add(step_loss, grad_norm, B * accum)
        pbar.update(1)
        logs = step % tc.log_every == 0 or step == 1 or step == tc.max_steps
        validates = step % tc.validate_every == 0 or step == tc.max_steps
        saves = step % tc.checkpoint_every == 0 or step == tc.max_steps
        if not (logs or validates or saves):
            continue
        # a sync point, on every process alike: read (and check) the steps since the last one
        vals, norm, ips = pending.flush()
        losses += vals
        pbar.set_postfix(loss=f"{vals[-1]:.4f}")
        if main and logs:
            peak = peak_memory_gb(acc.device)
            logger.scalars(step, {"loss": vals[-1], "lr": lr_sched.get_last_lr()[0], "grad_norm": norm,
                                  "images_per_s": ips, **({"peak_memory_gb": peak} if peak is not None else {})},
                           prefix="train/")
        if main and validates:
            grid = validation_grid(components, bare, dataset, pairs, prompts, tc, seed, ema)
            logger.image("validation", grid, step, path=out_dir / "validation" / f"step-{step:06d}.png")
            pending.t0 = time.perf_counter()  # the next interval times training only
        if saves:
            if main:
                save_checkpoint(ckpt_dir, step, {
                    "unet": trainable_state_dict(bare), "optimizer": optimizer.state_dict(),
                    "lr_scheduler": lr_sched.state_dict(), "ema": ema.state_dict() if ema else None,
                    "sampler": sampler.state_dict(), "rng": rng_state(), "world_size": world,
                }, dataclasses.asdict(cfg), keep=tc.checkpoints_keep, kind="finetune", trained_on=record)
            acc.wait_for_everyone()
            pending.t0 = time.perf_counter()
    pbar.close()

    # 4. The diffusers folder generation loads (EMA weights when kept, LoRA merged).
    final_dir = Path(final_dir) if final_dir is not None else out_dir / "final"
    if main:
        save_ip2p_folder(final_dir, components, bare, ema=ema, training={
            "resolution": tc.resolution, "vae_scale_factor": vae_scale_factor(components["vae"]), "steps": step,
            "base": cfg.model.base, "base_source": source or cfg.model.base,
            "prompt_template": cfg.captions.prompt_template,
            "captioner": cfg.captions.captioner, "ema": ema is not None, "lora_rank": tc.lora_rank})
    acc.wait_for_everyone()
    logger.close()
    return {"losses": losses, "step": step, "final_dir": final_dir, "images_per_s": ips, "cache_seconds": cache_s,
            "grad_accum": accum, "mixed_precision": str(acc.mixed_precision),
            "latent_cache_bytes": latents.nbytes, "text_cache_bytes": text.nbytes,
            "gradient_checkpointing": memory["gradient_checkpointing"], "peak_memory_gb": peak_memory_gb(acc.device)}


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


def run(cfg, accelerator, resume: str | None = None) -> dict:
    """The train_mvc stage: splits -> (clusters) -> pairs -> captions -> prompts -> base -> widen conv_in -> train
    -> final."""
    from mvc.core.paths import RunPaths
    from mvc.data import load_splits
    from mvc.data.captions import load_captions
    from mvc.data.prompts import make_prompt
    from mvc.diffusion.models import widen_conv_in

    acc, paths = accelerator, RunPaths.of(cfg)
    # Process 0 does any download / base building first; the others then read its caches. Captioning is
    # sharded: every process captions its share of what the cache lacks.
    with acc.main_process_first():
        labelled, pool, _test = load_splits(cfg.data)
        groups = sampling_groups(cfg, labelled, pool, acc.device, progress=acc.is_main_process)
        pairs = _pairs_for(cfg, labelled, paths.pairs, acc.is_main_process, groups)
    captions = load_captions(cfg, labelled, acc.is_main_process, acc.device, acc.process_index, acc.num_processes,
                             acc.wait_for_everyone)
    with acc.main_process_first():
        source = base_source(cfg, pool, paths.root, acc.is_main_process, acc.device, str(acc.mixed_precision))
        components = load_base(cfg, pool, paths.root, source=source)
    prompts = [make_prompt(cfg.captions.prompt_template, captions[i], labelled.classes[int(t)])
               for i, t in zip(labelled.ids, labelled.targets)]
    components["unet"] = widen_conv_in(components["unet"])
    return finetune(cfg, components, labelled, pairs, prompts, paths.mvc, resume=resume, accelerator=acc,
                    source=source)
