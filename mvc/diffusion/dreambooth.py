"""DreamBooth (Ruiz et al., CVPR 2023) as a generator of synthetic sets: one text-to-image model learns every
class at once, each concept bound to its own rare identifier, with prior preservation.

`get_dreambooth` reuses a finished model (other settings refused in one line) or trains it: `train_dreambooth`
builds the concepts' data (class images, caches) and a `DreamBoothTask` (weights, optimizer, data orders, the
prior-preservation loss of a step), which `mvc.diffusion.engine.train` runs data-parallel with checkpoints and
resume. The recipe step by step, determinism and processes: docs/dreambooth.md.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from mvc.core import seeds
from mvc.core.checkpoint import list_checkpoints, load_checkpoint
from mvc.core.distributed import broadcast_object, make_accelerator, shard_rows
from mvc.core.paths import RunPaths
from mvc.core.registry import config_rule
from mvc.core.utils import MVCError, atomic_path, atomic_write_json, batched, fingerprint
from mvc.data.prompts import (
    instance_prompt,
    prior_prompt,
    rare_identifiers,
    validate_identifiers,
    validate_instance_template,
)
from mvc.data.synthetic import class_folder
from mvc.diffusion.engine import Cadence, Task, draw_noise, train
from mvc.diffusion.finetune import GlobalBatchSampler, encode_latents_cache, noise_prediction_loss
from mvc.diffusion.finetune_setup import (
    TEXT_LORA_TARGETS,
    add_lora,
    build_adam,
    build_lr_scheduler,
    freeze,
    load_trainable_state_dict,
    prepare_unet,
    trainable_state_dict,
)
from mvc.diffusion.inputs import load_base
from mvc.diffusion.models import (
    base_identity,
    base_pipeline,
    base_resolution,
    sample_txt2img,
    save_txt2img_folder,
    training_info,
    vae_scale_factor,
)
from mvc.diffusion.sd_io import encode_ids, encode_prompts, text_hidden_states, tokenize

log = logging.getLogger(__name__)

KIND = "dreambooth"  # the checkpoints' kind and the final folder's `mvc_training.json` kind
# dreambooth.* keys that never change the weights; identifiers are in the concepts, the resolution is resolved
NOT_TRAINING = {"checkpoint_every", "checkpoints_keep", "log_every", "identifiers", "resolution"}
RESUME_FREE_KEYS = {"max_steps"}  # dreambooth.* keys a resumed run may change: it may train longer
# train.* keys DreamBooth shares with MVC's fine-tuning: how the optimizer runs, not what it learns from
SHARED_TRAIN_KEYS = ("adam_beta1", "adam_beta2", "use_8bit_adam", "fused_adam", "max_grad_norm", "attention")


#################################################################################
#                                   Concepts                                    #
#################################################################################

@dataclass(frozen=True)
class DreamBoothConcept:
    """One thing DreamBooth learns: the labelled images `indices` (positions in the labelled subset), all of
    class `label`, bound to the rare `identifier`."""
    label: int
    identifier: str
    indices: tuple[int, ...]

    def describe(self, labelled: Any) -> dict:
        """The concept as recorded in the final folder (members by id)."""
        return {"label": self.label, "class_name": labelled.classes[self.label], "identifier": self.identifier,
                "size": len(self.indices), "source_ids": [str(labelled.ids[i]) for i in self.indices]}


def make_concepts(labelled: Any, groups: Sequence[tuple[int, Sequence[int]]] | None = None,
                  identifiers: Sequence[str] = ()) -> list[DreamBoothConcept]:
    """The concepts DreamBooth trains: one per group (label, labelled indices) or, without `groups`, one per
    class with images; identifiers from `identifiers` in order, else the default rare ones."""
    targets = np.asarray(labelled.targets)
    if groups is None:
        groups = [(c, np.flatnonzero(targets == c).tolist()) for c in range(len(labelled.classes))
                  if (targets == c).any()]
    if identifiers and len(identifiers) < len(groups):
        raise MVCError(f"dreambooth.identifiers names {len(identifiers)} identifier(s) for {len(groups)} concepts; "
                       "give one per concept, or [] for the default rare ones")
    idents = list(identifiers) if identifiers else list(islice(rare_identifiers(), len(groups)))
    concepts = [DreamBoothConcept(int(c), idents[k], tuple(int(i) for i in idx)) for k, (c, idx) in enumerate(groups)]
    check_concepts(concepts, labelled)
    return concepts


def check_concepts(concepts: Sequence[DreamBoothConcept], labelled: Any) -> None:
    """Refuse concepts that cannot train: none, an empty one, an image outside the subset or of another class,
    identifiers that repeat (also when CLIP lower-cases them)."""
    if not concepts:
        raise MVCError("DreamBooth has no concept to learn: the labelled subset is empty")
    validate_identifiers([c.identifier for c in concepts])
    targets = np.asarray(labelled.targets)
    for c in concepts:
        if not c.indices:
            raise MVCError(f"the DreamBooth concept {c.identifier!r} has no image; drop it or give it images")
        bad = [i for i in c.indices if not 0 <= i < len(targets) or int(targets[i]) != c.label]
        if bad:
            raise MVCError(f"the DreamBooth concept {c.identifier!r} (class {c.label}) lists image {bad[0]}, which is "
                           "not a labelled image of that class")


def check_prompt_tokens(tokenizer: Any, concepts: Sequence[DreamBoothConcept], template: str,
                        classes: Sequence[str]) -> None:
    """Each identifier tokenizes (no unknown token) into tokens of its own, and no instance prompt is cut off by
    the tokenizer's length (the identifier would be lost)."""
    seen: dict[tuple[int, ...], str] = {}
    for c in concepts:
        ids = tuple(tokenizer(c.identifier, add_special_tokens=False)["input_ids"])
        if tokenizer.unk_token_id in ids and tokenizer.unk_token_id not in (tokenizer.eos_token_id,
                                                                            tokenizer.bos_token_id):
            raise MVCError(f"the identifier {c.identifier!r} has characters the tokenizer does not know; use ASCII")
        if ids in seen:
            raise MVCError(f"the identifiers {seen[ids]!r} and {c.identifier!r} tokenize alike; give distinct ones")
        seen[ids] = c.identifier
        prompt = instance_prompt(template, c.identifier, classes[c.label])
        n = len(tokenizer(prompt)["input_ids"])
        if n > tokenizer.model_max_length:
            raise MVCError(f"the instance prompt {prompt!r} is {n} tokens, more than the tokenizer's "
                           f"{tokenizer.model_max_length}; shorten dreambooth.instance_prompt or the identifier")


#################################################################################
#                          Settings and what they key                           #
#################################################################################

def training_resolution(cfg: Any, base: str) -> int:
    """`dreambooth.resolution`, else the base's native size."""
    if cfg.dreambooth.resolution is not None:
        return int(cfg.dreambooth.resolution)
    return base_resolution(base, cfg.model.revision if cfg.model.base != "tiny" else None)


def base_id(cfg: Any, base: str) -> dict:
    """The base's identity (its folder, or hub id, revision and variant)."""
    return base_identity(base, cfg.model)


def optimizer_config(cfg: Any) -> Any:
    """The train section with DreamBooth's own steps, LR, schedule, weight decay, LoRA rank and checkpointing:
    what `mvc.diffusion.finetune_setup`'s builders read."""
    db = cfg.dreambooth
    return dataclasses.replace(cfg.train, max_steps=db.max_steps, lr=db.lr, lr_scheduler=db.lr_scheduler,
                               lr_warmup_steps=db.lr_warmup_steps, weight_decay=db.weight_decay,
                               lora_rank=db.lora_rank, gradient_checkpointing=db.gradient_checkpointing)


def prior_on(cfg: Any) -> bool:
    """Whether training uses prior preservation (class images and a prior loss weight)."""
    return cfg.dreambooth.num_class_images > 0 and cfg.dreambooth.prior_loss_weight > 0


def prior_settings(cfg: Any, base: str, resolution: int, seed: int) -> dict:
    """Everything that changes the class images (the class and its index name their folder)."""
    db = cfg.dreambooth
    return {**base_id(cfg, base), "instance_prompt": db.instance_prompt, "steps": db.prior_steps,
            "guidance_scale": db.prior_guidance_scale, "scheduler": db.prior_scheduler, "resolution": resolution,
            "seed": seed}


def training_record(cfg: Any, labelled: Any, concepts: Sequence[DreamBoothConcept], base: str, resolution: int,
                    seed: int, precision: str) -> dict:
    """What a DreamBooth model's weights depend on (flat): the base, the labelled subset, the concepts, the
    dreambooth.* and shared train.* keys, the resolution, the seed and the mixed precision."""
    return {**base_id(cfg, base), "data": labelled.fingerprint(), "classes": list(labelled.classes),
            "concepts": fingerprint([c.describe(labelled) for c in concepts]),
            **{f"dreambooth.{k}": v for k, v in dataclasses.asdict(cfg.dreambooth).items() if k not in NOT_TRAINING},
            **{f"train.{k}": getattr(cfg.train, k) for k in SHARED_TRAIN_KEYS},
            "resolution": resolution, "seed": int(seed), "mixed_precision": precision}


#################################################################################
#                         Class images (prior preservation)                     #
#################################################################################

def class_image_files(folder: Path, label: int, classes: Sequence[str], n: int) -> list[Path]:
    """The n class-image files of class `label` in a class-image folder."""
    sub = folder / class_folder(label, classes[label], len(classes))
    return [sub / f"{i:05d}.png" for i in range(n)]


@torch.no_grad()
def class_images(cfg: Any, components: dict, labels: Sequence[int], classes: Sequence[str], folder: Path,
                 resolution: int, seed: int, device: Any = None, progress: bool = True, rank: int = 0,
                 world: int = 1) -> dict[int, list[Path]]:
    """The class images of every class of `labels` (`dreambooth.num_class_images` each): the base's text-to-image
    samples of the class prompt, image i of class c from `seeds.generator(seed, "dreambooth.prior", c, i)`.
    Only the missing files are made (each written atomically), process `rank` of `world` making the missing ones
    of every world-th file (the caller waits for all before reading); returns the files per class. The share is
    taken of every file, not of the missing ones: a process that looks later, after another wrote some of its
    share, must not take another share (which would leave files nobody makes)."""
    db = cfg.dreambooth
    files = {c: class_image_files(folder, c, classes, db.num_class_images) for c in labels}
    plan = [(c, i, f) for c in labels for i, f in enumerate(files[c])]
    todo = [(c, i, f) for c, i, f in plan[rank::world] if not f.is_file()]
    if not todo:
        return files
    pipe = base_pipeline(components, "txt2img", db.prior_scheduler)
    if device is not None:
        pipe.to(device)
    neg = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""])  # (1, T, D)
    prompts = {c: encode_prompts(pipe.tokenizer, pipe.text_encoder, [prior_prompt(db.instance_prompt, classes[c])])
               for c in labels}  # each (1, T, D)
    bar = tqdm(total=len(todo), desc="dreambooth: class images", unit="img", disable=not progress)
    from mvc.core.perf import DEFAULT_BATCH

    for batch in batched(todo, cfg.generate.batch_size or DEFAULT_BATCH):
        gens = [seeds.generator(seed, "dreambooth.prior", c, i) for c, i, _ in batch]
        images = sample_txt2img(pipe, torch.cat([prompts[c] for c, _, _ in batch]), neg.expand(len(batch), -1, -1),
                                gens, resolution, db.prior_steps, db.prior_guidance_scale)
        for (_, _, f), im in zip(batch, images):
            with atomic_path(f) as tmp:
                im.save(tmp, format="PNG")
        bar.update(len(batch))
    bar.close()
    return files


#################################################################################
#                                     Loss                                      #
#################################################################################

def prior_preservation_loss(per_sample: torch.Tensor, num_instance: int, weight: float, batch_size: int | None = None,
                            world: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, instance loss, prior loss) of rows whose first `num_instance` of `per_sample` (b,) are instance images
    and the rest class images: instance + weight * prior (prior 0 without rows), each part the mean of its rows.

    Data-parallel, `per_sample` is one process's shard of a global batch of `batch_size` instance and `batch_size`
    class rows over `world` processes: each part is then sum(rows) * world / batch_size, so that the average over
    processes (DDP's gradient averaging, a "mean" reduction of the parts) is the global batch's means."""
    def part(rows: torch.Tensor) -> torch.Tensor:
        return rows.mean() if batch_size is None else rows.sum() * (world / batch_size)

    inst = part(per_sample[:num_instance])
    prior = part(per_sample[num_instance:]) if len(per_sample) > num_instance else torch.zeros_like(inst)
    return inst + weight * prior, inst, prior


#################################################################################
#                                   Training                                    #
#################################################################################

@dataclass
class _Data:
    """What the loop reads: the latent caches of instance and class images, the prompts' token ids, and which
    prompt row each cached image takes."""
    inst_cache: Any            # LatentCache of the instance images, (N, 1, C, h, w)
    prior_cache: Any           # LatentCache of the class images, or None
    ids: torch.Tensor          # (P, T) token ids: concept k's instance prompt is row k, then the class prompts
    mask: torch.Tensor         # (P, T)
    inst_prompt: torch.Tensor  # (N,) prompt row of each instance image
    prior_prompt: torch.Tensor  # (M,) prompt row of each class image
    labels: list               # the classes of the concepts


def _data(cfg: Any, comps: dict, labelled: Any, concepts: Sequence[DreamBoothConcept], base: str, out_dir: Path,
          resolution: int, seed: int, acc: Any, progress: bool) -> _Data:
    """Class images (made by every process, a share each), then one-off caches: VAE posteriors of every instance
    and class image, token ids of every prompt."""
    db, classes = cfg.dreambooth, list(labelled.classes)
    labels = sorted({c.label for c in concepts})
    priors: dict[int, list[Path]] = {}
    if prior_on(cfg):
        folder = out_dir / "class_images" / fingerprint(prior_settings(cfg, base, resolution, seed))
        if acc.is_main_process:
            atomic_write_json(folder / "settings.json", prior_settings(cfg, base, resolution, seed))
        priors = class_images(cfg, comps, labels, classes, folder, resolution, seed, acc.device, progress,
                              acc.process_index, acc.num_processes)
        acc.wait_for_everyone()  # every process's share is written
    freeze(comps["vae"], comps["text_encoder"])
    items = [(k, i) for k, c in enumerate(concepts) for i in c.indices]  # (concept, labelled index) per row
    inst_cache = encode_latents_cache(comps["vae"], labelled.subset(np.array([i for _, i in items])), resolution,
                                      show_progress=progress)
    prior_rows = [(c, f) for c in labels for f in priors.get(c, [])]
    prior_cache = (encode_latents_cache(comps["vae"], [(_load_rgb(f), c) for c, f in prior_rows], resolution,
                                        show_progress=progress) if prior_rows else None)
    prompts = ([instance_prompt(db.instance_prompt, c.identifier, classes[c.label]) for c in concepts]
               + [prior_prompt(db.instance_prompt, classes[c]) for c in labels])
    ids, mask = tokenize(comps["tokenizer"], prompts)  # (P, T)
    return _Data(inst_cache, prior_cache, ids, mask, torch.tensor([k for k, _ in items]),
                 torch.tensor([len(concepts) + labels.index(c) for c, _ in prior_rows], dtype=torch.long), labels)


class DreamBoothTask(Task):
    """DreamBooth for `engine.train`: every step draws B instance and B class images (each from its own endless
    permutation), every process the same global batch, and runs its rows of both halves through the U-Net in one
    call; its loss is scaled (`prior_preservation_loss`) so that DDP's average is the global batch's loss."""
    kind, label, prefix, step_role = KIND, "dreambooth", "dreambooth/", "dreambooth.step"
    error_prefix, nonfinite_fix = "dreambooth: ", "lower dreambooth.lr"

    def __init__(self, cfg: Any, comps: dict, data: _Data, labelled: Any, concepts: Sequence[DreamBoothConcept],
                 base: str, record: dict, resolution: int, seed: int, acc: Any, out_dir: Path, t0: float):
        db = cfg.dreambooth
        self.cfg, self.comps, self.data, self.acc, self.seed, self.t0 = cfg, comps, data, acc, seed, t0
        self.labelled, self.concepts, self.base, self.record = labelled, concepts, base, record
        self.resolution = resolution
        self.final = out_dir / "final"
        self.unet, self.text_encoder = comps["unet"], comps["text_encoder"]
        self.B = db.batch_size
        self.keep = shard_rows(self.B, acc.num_processes, acc.process_index, "dreambooth.batch_size")  # of each half
        self.table = (None if db.train_text_encoder  # the prompts' hidden states (P, T, D) when the encoder is frozen
                      else encode_ids(self.text_encoder, data.ids, data.mask).float())
        ocfg = optimizer_config(cfg)
        self.params = _trainable(cfg, ocfg, self.unet, self.text_encoder, seed, acc.device)
        self.optimizer = build_adam(self.params, ocfg)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, ocfg)
        self.max_grad_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else float("inf")
        self.inst_order = GlobalBatchSampler(len(data.inst_prompt), seeds.generator(seed, "dreambooth.order", 0))
        self.prior_order = (GlobalBatchSampler(len(data.prior_prompt), seeds.generator(seed, "dreambooth.order", 1))
                            if data.prior_cache is not None else None)
        self.images_per_step = self.B * (2 if self.prior_order is not None else 1)

    def models(self) -> list:
        # through accelerate: DDP under several processes, its mixed precision's autocast
        return [self.unet, self.text_encoder] if self.cfg.dreambooth.train_text_encoder else [self.unet]

    def set_prepared(self, models: list) -> None:
        self.unet = models[0]
        if self.cfg.dreambooth.train_text_encoder:
            self.text_encoder = models[1]

    def restore(self, ckpt: dict | None) -> None:
        if ckpt is None:
            return
        load_trainable_state_dict(self.unet, ckpt["unet"])
        if self.cfg.dreambooth.train_text_encoder:
            load_trainable_state_dict(self.text_encoder, ckpt["text_encoder"])
        self.inst_order.load_state_dict(ckpt["instance_order"])
        if self.prior_order is not None:
            self.prior_order.load_state_dict(ckpt["prior_order"])
        log.info("dreambooth: resumed from step %d", int(ckpt["step"]))

    def state(self) -> dict:
        unwrap = self.acc.unwrap_model
        return {"unet": trainable_state_dict(unwrap(self.unet)),
                "text_encoder": (trainable_state_dict(unwrap(self.text_encoder))
                                 if self.cfg.dreambooth.train_text_encoder else None),
                "instance_order": self.inst_order.state_dict(),
                "prior_order": self.prior_order.state_dict() if self.prior_order is not None else None}

    def batch(self, generator: torch.Generator) -> tuple:
        """One step's global batch (B instance rows, then B class rows; every process draws the same) and this
        process's rows of it: (latents (b, C, h, w) posterior samples, prompt rows (b,), noise (b, C, h, w),
        timesteps (b,))."""
        data, B = self.data, self.B
        inst = self.inst_order.next(B)
        mean, std, rows = data.inst_cache.mean[inst, 0], data.inst_cache.std[inst, 0], data.inst_prompt[inst]
        local = torch.arange(B)[self.keep]  # this process's rows of the global batch
        if self.prior_order is not None:
            pr = self.prior_order.next(B)
            mean, std = torch.cat([mean, data.prior_cache.mean[pr, 0]]), torch.cat([std, data.prior_cache.std[pr, 0]])
            rows = torch.cat([rows, data.prior_prompt[pr]])
            local = torch.cat([local, B + local])
        t, noise, eps = draw_noise(len(rows), tuple(data.inst_cache.mean.shape[2:]),
                                   self.comps["scheduler"].config.num_train_timesteps, generator)  # global batch
        latents = (mean + std * eps) * data.inst_cache.scaling_factor
        return latents[local], rows[local], noise[local], t[local]

    def loss(self, step: int, micro: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's share of B instance rows, then of B class rows, in one U-Net call."""
        acc, data, dev = self.acc, self.data, self.acc.device
        latents, rows, noise, t = self.batch(generator)
        with acc.autocast():
            embeds = (text_hidden_states(self.text_encoder, data.ids[rows].to(dev), data.mask[rows].to(dev))
                      if self.table is None else self.table[rows.to(self.table.device)])  # (b, T, D)
            per_sample = noise_prediction_loss(self.unet, self.comps["scheduler"], latents.to(dev), embeds,
                                               noise.to(dev), t.to(dev))
        loss, inst_loss, prior_loss = prior_preservation_loss(per_sample, self.keep.stop - self.keep.start,
                                                              self.cfg.dreambooth.prior_loss_weight, self.B,
                                                              acc.num_processes)
        return loss, acc.reduce(torch.stack([inst_loss, prior_loss]).detach(), reduction="mean")

    def loss_value(self, record: Any) -> float:
        return record[0] + self.cfg.dreambooth.prior_loss_weight * record[1]

    def scalars(self, record: Any) -> dict:
        return {"loss": self.loss_value(record), "instance_loss": record[0], "prior_loss": record[1]}

    def export(self, step: int, result: dict) -> None:
        """The StableDiffusionPipeline folder generation samples, with what it was trained on."""
        cfg, db, classes, unwrap = self.cfg, self.cfg.dreambooth, list(self.labelled.classes), self.acc.unwrap_model
        save_txt2img_folder(self.final, self.comps, unwrap(self.unet), unwrap(self.text_encoder), {
            "kind": KIND, "resolution": self.resolution, "vae_scale_factor": vae_scale_factor(self.comps["vae"]),
            "steps": step, "base": cfg.model.base, "base_source": self.base, "instance_prompt": db.instance_prompt,
            "class_prompts": {classes[c]: prior_prompt(db.instance_prompt, classes[c]) for c in self.data.labels},
            "num_class_images": db.num_class_images if prior_on(cfg) else 0, "lora_rank": db.lora_rank,
            "train_text_encoder": db.train_text_encoder, "prior_loss_weight": db.prior_loss_weight,
            "concepts": [c.describe(self.labelled) for c in self.concepts], "settings": self.record,
            "seconds": round(time.perf_counter() - self.t0, 1)})


def train_dreambooth(cfg: Any, labelled: Any, concepts: Sequence[DreamBoothConcept], base: str, out_dir: Path,
                     record: dict, resolution: int, seed: int, accelerator: Any, progress: bool = True) -> Path:
    """Fine-tune the base on the concepts, data-parallel over the accelerator's processes (resuming
    `out_dir/checkpoints` when it holds this run's checkpoints); the main process saves `out_dir/final`, returned
    on every process."""
    db, acc, t0 = cfg.dreambooth, accelerator, time.perf_counter()
    ckpt_dir = out_dir / "checkpoints"
    comps = load_base(cfg, None, RunPaths.of(cfg).root, source=base)
    if comps["unet"].config.in_channels != comps["vae"].config.latent_channels:
        raise MVCError(f"the base U-Net takes {comps['unet'].config.in_channels} input channels: DreamBooth needs a "
                       "text-to-image base (not an InstructPix2Pix folder) as model.base")
    check_prompt_tokens(comps["tokenizer"], concepts, db.instance_prompt, list(labelled.classes))
    for m in (comps["unet"], comps["vae"], comps["text_encoder"]):  # class images and caches on the device
        m.to(acc.device)
    data = _data(cfg, comps, labelled, concepts, base, out_dir, resolution, seed, acc, progress and acc.is_main_process)
    task = DreamBoothTask(cfg, comps, data, labelled, concepts, base, record, resolution, seed, acc, out_dir, t0)
    free = {f"dreambooth.{k}" for k in RESUME_FREE_KEYS}
    trained_on = {k: v for k, v in record.items() if k not in free}
    cadence = Cadence(db.max_steps, db.log_every, db.checkpoint_every, db.checkpoints_keep, log_at_checkpoints=True)
    train(task, acc, out_dir, cadence, dataclasses.asdict(cfg), trained_on,
          resume="latest" if list_checkpoints(ckpt_dir) else None,
          fix=f"restore those settings, or delete {ckpt_dir} to train anew", progress=progress)
    return task.final


def _trainable(cfg: Any, ocfg: Any, unet: Any, text_encoder: Any, seed: int, device: torch.device) -> list:
    """Make the U-Net (and, with `train_text_encoder`, the text encoder) trainable, fully or through LoRA adapters;
    returns the trainable parameters. LoRA adapters start from random weights drawn from the run's seed (role
    `dreambooth.init`): the same in every process and every run."""
    db = cfg.dreambooth
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seeds.derive_seed(seed, "dreambooth.init"))
        params = prepare_unet(unet, ocfg, train_conv_in=False)
        if db.train_text_encoder:
            if db.lora_rank > 0:
                add_lora(text_encoder, db.lora_rank, TEXT_LORA_TARGETS)
            else:
                text_encoder.requires_grad_(True)
            text_encoder.to(device).train()
            params += [p for p in text_encoder.parameters() if p.requires_grad]
    return params


def _load_rgb(path: Path):
    """A class image as an RGB PIL image, read now (the file is closed)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def _seed(cfg: Any, final: Path, ckpt_dir: Path) -> int:
    """The training seed: run.seed, else (null) the one the finished folder or this run's checkpoints recorded,
    else a fresh one."""
    if cfg.run.seed is not None:
        return int(cfg.run.seed)
    old = training_info(final).get("settings", {}).get("seed")
    if old is None and list_checkpoints(ckpt_dir):
        old = (load_checkpoint(list_checkpoints(ckpt_dir)[-1]).get("trained_on") or {}).get("seed")
    return int(old) if old is not None else seeds.resolve_seed(None)


def get_dreambooth(cfg: Any, labelled: Any, concepts: Sequence[DreamBoothConcept], base: str,
                   progress: bool = True) -> Path:
    """The finished DreamBooth folder of these concepts and settings: `<run.output_dir>/dreambooth/final`, trained
    first when it is missing; a finished folder trained with other settings is refused, naming what differs."""
    out = RunPaths.of(cfg).dreambooth
    final = out / "final"
    acc = make_accelerator()  # the stage's (accelerate's) device and mixed precision
    resolution = training_resolution(cfg, base)
    seed = broadcast_object(acc, _seed(cfg, final, out / "checkpoints"))  # one seed for every process
    record = training_record(cfg, labelled, concepts, base, resolution, seed, str(acc.mixed_precision))
    if (final / "model_index.json").is_file():
        info = training_info(final)
        if info.get("kind") != KIND:
            raise MVCError(f"{final} is not a DreamBooth folder ({'kind ' + str(info.get('kind')) if info else 'no '}"
                           "mvc_training.json); move it away")
        old = info.get("settings") or {}
        if fingerprint(old) == fingerprint(record):
            log.info("dreambooth: reusing %s", final)
            return final
        diff = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
        raise MVCError(f"{final} was trained with other settings (differ: {', '.join(diff[:4])}"
                       f"{' ...' if len(diff) > 4 else ''}); restore them, or delete {final} and {out / 'checkpoints'} "
                       "to train anew (the class images are kept)")
    return train_dreambooth(cfg, labelled, concepts, base, out, record, resolution, record["seed"], acc, progress)


#################################################################################
#                        Config rules (mvc.core.registry)                       #
#################################################################################

@config_rule("dreambooth.instance_prompt")
def _instance_prompt(cfg: Any) -> None:
    validate_instance_template(cfg.dreambooth.instance_prompt)


@config_rule("dreambooth.identifiers")
def _identifiers(cfg: Any) -> None:
    validate_identifiers(cfg.dreambooth.identifiers)
