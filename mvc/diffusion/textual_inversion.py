"""Textual inversion (DA-Fusion's recipe): one learned word embedding per concept, then SDEdit with that word.

A `PlaceholderConcept` is a class label, a placeholder token and the labelled images the token stands for (one per
class by default, `class_concepts`). `ensure_embeddings` reuses a finished result or trains one: an `InversionTask`
learns the tokens' input-embedding vectors on the frozen base, run by `mvc.diffusion.engine.train` (checkpoints,
resume, data-parallel), and writes `learned_embeds.safetensors` (diffusers' layout) and `training.json`.
Generation (`generate.method=textual_inversion`) runs img2img with each concept's token in the prompt.
The choices, tied to what the pipelines do at sampling time, and the files: docs/textual_inversion.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mvc.core.checkpoint import list_checkpoints, trained_on_diff
from mvc.core.distributed import broadcast_seed, make_accelerator, shard_rows
from mvc.core.registry import config_rule
from mvc.core.utils import MVCError, atomic_path, atomic_write_json, fingerprint
from mvc.diffusion.engine import Cadence, Task, draw_noise, train
from mvc.diffusion.finetune import noise_prediction_loss

log = logging.getLogger(__name__)

KIND = "textual_inversion"  # the checkpoints' kind
FORMAT_VERSION = 1
EMBEDS_FILE = "learned_embeds.safetensors"
INFO_FILE = "training.json"
TOKEN = "<mvc-class-{label}>"  # the default placeholder of class `label`
EXAMPLE_TEMPLATE = "a photo of a {token}"
# textual_inversion.* keys a resumed (or reused) run may change: they do not change the learned vectors (`steps` may
# grow: training continues)
RESUME_FREE_KEYS = {"steps", "checkpoint_every", "checkpoints_keep", "log_every", "prompt"}


#################################################################################
#                                   Concepts                                    #
#################################################################################

@dataclass(frozen=True)
class PlaceholderConcept:
    """What one placeholder token learns: the labelled images `indices` (positions in the labelled subset)
    of class `label`, starting from the embedding of the first token of `initializer`."""
    label: int
    token: str
    indices: tuple[int, ...]
    initializer: str


def class_concepts(labelled: Any, initializer: str | None = None) -> list[PlaceholderConcept]:
    """One concept per class that has labelled images: `<mvc-class-<label>>`, all its images, initialised
    from `initializer` or else the class name."""
    targets = np.asarray(labelled.targets)
    return [PlaceholderConcept(c, TOKEN.format(label=c), tuple(np.flatnonzero(targets == c).tolist()),
                    initializer or labelled.classes[c])
            for c in range(len(labelled.classes)) if (targets == c).any()]


def check_concepts(concepts: Sequence[PlaceholderConcept], labelled: Any) -> None:
    """Refuse concepts that cannot be trained: none at all, a repeated or blank token, no images, or images
    outside the labelled subset or of another class."""
    if not concepts:
        raise MVCError("textual inversion got no concept to learn (the labelled subset is empty?)")
    tokens = [c.token for c in concepts]
    if len(set(tokens)) < len(tokens):
        raise MVCError(f"textual inversion: concept tokens repeat ({', '.join(sorted(tokens))}); give each its own")
    targets = np.asarray(labelled.targets)
    for c in concepts:
        if not c.token.strip() or len(c.token.split()) != 1:
            raise MVCError(f"textual inversion: concept token {c.token!r} must be one word without spaces")
        idx = np.asarray(c.indices, dtype=np.int64)
        if len(idx) == 0:
            raise MVCError(f"textual inversion: concept {c.token} has no images")
        if idx.min() < 0 or idx.max() >= len(targets) or (targets[idx] != c.label).any():
            raise MVCError(f"textual inversion: concept {c.token} lists images outside the labelled subset or of "
                           f"another class than {c.label}")


def concept_prompt(template: str, token: str) -> str:
    """A prompt of a concept: `template` (which must hold {token} and nothing else) filled with its token."""
    from mvc.data.prompts import validate_template

    return validate_template(template, ("token",), EXAMPLE_TEMPLATE).format(token=token)


def source_tokens(concepts: Sequence[dict], targets: Sequence[int]) -> dict[int, str]:
    """The token each labelled image is generated with: the one of the concept that lists it, else the first
    concept of its class (`concepts`: the records of `training.json`)."""
    out: dict[int, str] = {}
    first: dict[int, str] = {}
    for c in concepts:
        first.setdefault(int(c["label"]), c["token"])
        for i in c["indices"]:
            out.setdefault(int(i), c["token"])
    for i, t in enumerate(np.asarray(targets).tolist()):
        if i not in out:
            if t not in first:
                raise MVCError(f"textual inversion learned no concept of class {t}; train one for every class "
                               "that is generated")
            out[i] = first[t]
    return out


#################################################################################
#                           Tokens and the embedding                            #
#################################################################################

def vector_tokens(token: str, num_vectors: int) -> list[str]:
    """The tokens of a concept's vectors: `<t>`, then `<t>_1`, `<t>_2`, ... (diffusers' multi-vector naming)."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def first_token_id(tokenizer: Any, word: str) -> int:
    """The id of the first token of `word` (an initializer)."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise MVCError(f"textual inversion: the initializer {word!r} has no token; set textual_inversion.initializer "
                       "to a word")
    return int(ids[0])


def add_placeholders(tokenizer: Any, text_encoder: Any, concepts: Sequence[PlaceholderConcept],
                     num_vectors: int) -> torch.Tensor:
    """Add every concept's vector tokens to the tokenizer and rows for them to the text encoder's input
    embedding, each initialised from its initializer's first token; returns their ids (C, V) long."""
    names = [t for c in concepts for t in vector_tokens(c.token, num_vectors)]
    vocab = tokenizer.get_vocab()
    taken = [t for t in names if t in vocab]
    if taken:
        raise MVCError(f"textual inversion: the token {taken[0]!r} is already in the base's vocabulary; name the "
                       "concepts' tokens otherwise")
    init = [first_token_id(tokenizer, c.initializer) for c in concepts]
    tokenizer.add_tokens(names)
    ids = torch.tensor(tokenizer.convert_tokens_to_ids(names), dtype=torch.long).view(len(concepts), num_vectors)
    for name, i in zip(names, ids.flatten().tolist()):
        if tokenizer(name, add_special_tokens=False).input_ids != [i]:
            raise MVCError(f"textual inversion: the token {name!r} does not tokenize as one token; use a lower-case "
                           "name such as <my-concept>")
    rows = text_encoder.get_input_embeddings().weight.shape[0]
    if int(ids.max()) >= rows:
        with torch.random.fork_rng(devices=[]):  # the new rows' random init must not move the caller's RNG
            text_encoder.resize_token_embeddings(int(ids.max()) + 1, mean_resizing=False)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for row, src in zip(ids, init):
            weight[row] = weight[src].clone()
    return ids


def embedding_name(text_encoder: Any) -> str:
    """The parameter name of the text encoder's input (token) embedding."""
    w = text_encoder.get_input_embeddings().weight
    return next(n for n, p in text_encoder.named_parameters() if p is w)


def encode_learned(text_encoder: Any, name: str, weight: torch.Tensor, rows: torch.Tensor, vectors: torch.Tensor,
                   ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Text-encoder hidden states (b, L, D) of token ids (b, L) with the rows `rows` (N,) of its input embedding
    `weight` (V, D) replaced by `vectors` (N, D): gradients reach `vectors` only, no weight is written."""
    from torch.func import functional_call

    learned = weight.index_put((rows,), vectors.to(weight.dtype))  # (V, D), a new tensor
    use_mask = mask is not None and getattr(text_encoder.config, "use_attention_mask", False)  # as mvc.diffusion.sd_io
    return functional_call(text_encoder, {name: learned}, (ids,), {"attention_mask": mask if use_mask else None})[0]


#################################################################################
#                                 Step draws                                    #
#################################################################################

@dataclass
class StepDraws:
    """Every random draw of one step (B rows)."""
    concept: torch.Tensor   # (B,) long, the concept each row trains
    image: torch.Tensor     # (B,) long, position of the row's image within its concept
    template: torch.Tensor  # (B,) long
    timesteps: torch.Tensor  # (B,) long
    noise: torch.Tensor     # (B, C, h, w) diffusion noise
    eps: torch.Tensor       # (B, C, h, w) posterior-sample noise of the image latent


def draw_concept_rows(step: int, batch_size: int, sizes: Sequence[int], num_templates: int,
                      latent_shape: tuple[int, ...], num_train_timesteps: int, generator: torch.Generator) -> StepDraws:
    """The draws of step `step`: concepts in turn ((step * B + r) mod C), an image uniformly within each row's
    concept (`sizes`: images per concept), a template, then the timesteps and noises (`engine.draw_noise`), from
    `generator`."""
    n = torch.as_tensor(list(sizes), dtype=torch.long)
    concept = (step * batch_size + torch.arange(batch_size)) % len(n)
    u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
    image = torch.minimum((u * n[concept]).long(), n[concept] - 1)
    template = torch.randint(0, num_templates, (batch_size,), generator=generator)
    t, noise, eps = draw_noise(batch_size, latent_shape, num_train_timesteps, generator)
    return StepDraws(concept, image, template, t, noise, eps)


#################################################################################
#                               Files of a result                               #
#################################################################################

def file_fingerprint(path: Path) -> str:
    """A short hash of a file's bytes."""
    return fingerprint(np.frombuffer(Path(path).read_bytes(), dtype=np.uint8))


def read_info(folder: str | Path) -> dict | None:
    """`training.json` of a textual-inversion folder (None when there is none)."""
    p = Path(folder) / INFO_FILE
    if not p.is_file():
        return None
    try:
        info = json.loads(p.read_text())
        if info.get("format") != FORMAT_VERSION or not isinstance(info.get("trained_on"), dict):
            raise ValueError
    except (ValueError, AttributeError):
        raise MVCError(f"{p} is not a textual-inversion result of format {FORMAT_VERSION}; delete {Path(folder)} to "
                       "train anew") from None
    return info


def save_learned_embeds(path: Path, tokens: Sequence[str], vectors: torch.Tensor) -> None:
    """Write {token: (V, D)} (vectors (C, V, D)) as safetensors, the layout diffusers' loader reads, atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({t: v.detach().float().cpu().contiguous() for t, v in zip(tokens, vectors)}, str(tmp),
                  metadata={"format": "pt"})


def load_learned_embeds(pipe: Any, path: str | Path) -> list[str]:
    """Load learned embeddings into a diffusers SD pipeline with its own `load_textual_inversion`; returns the
    tokens (each may stand for several vectors)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    if not state:
        raise MVCError(f"{path} holds no embedding; delete its folder to train anew")
    # diffusers grows the embedding to len(tokenizer) + the vectors with transformers' default mean_resizing,
    # the covariance of the whole vocabulary (a warning, ~1 s on SD-1.5) for rows it overwrites; growing it to
    # that size first, plainly, makes its resize a no-op
    grown = len(pipe.tokenizer) + sum(int(v.shape[0]) if v.ndim > 1 else 1 for v in state.values())
    with torch.random.fork_rng(devices=[]):
        pipe.text_encoder.resize_token_embeddings(grown, mean_resizing=False)
    try:
        pipe.load_textual_inversion(list(state.values()), token=list(state))
    except ValueError as e:
        raise MVCError(f"cannot load the embeddings {path} into the pipeline: {str(e).splitlines()[0]}") from None
    return list(state)


#################################################################################
#                                   Training                                    #
#################################################################################

def trained_on(cfg: Any, labelled: Any, concepts: Sequence[PlaceholderConcept], base: dict, resolution: int,
               precision: str = "no") -> dict:
    """What the learned vectors depend on (recorded in checkpoints and training.json; a reuse must match):
    the labelled subset, the concepts, the base, the resolution, the seed, the textual_inversion.* keys
    that change them and the mixed precision (only when not 'no', so fp32 results of older versions match)."""
    return {"data": labelled.fingerprint(), "concepts": fingerprint([dataclasses.asdict(c) for c in concepts]),
            **{f"model.{k}": v for k, v in base.items()}, "resolution": int(resolution), "run.seed": cfg.run.seed,
            **{f"textual_inversion.{k}": v for k, v in dataclasses.asdict(cfg.textual_inversion).items()
               if k not in RESUME_FREE_KEYS},
            **({"mixed_precision": precision} if precision != "no" else {})}


def _refuse_other(old: dict, new: dict, what: Path, folder: Path) -> None:
    """One line naming what differs between a stored result (or checkpoint) and this run, if anything does."""
    diff = trained_on_diff(old, new)
    if diff:
        raise MVCError(f"{what} was trained on other {diff}; restore those settings, or delete {folder} to train the "
                       "embeddings anew")


def ensure_embeddings(cfg: Any, labelled: Any, base: str, resolution: int,
                      concepts: Sequence[PlaceholderConcept] | None = None, accelerator: Any = None,
                      progress: bool = True) -> Path:
    """The textual-inversion folder of this run with embeddings learned for `concepts` (default: one per
    class): reused when finished with these settings, else trained (or continued) on `base` (a folder or
    hub id) at `resolution` with `accelerator` (default: the stage's). Under several processes, every one
    calls it together (they train data-parallel)."""
    from mvc.core.paths import RunPaths
    from mvc.diffusion.inputs import load_base
    from mvc.diffusion.models import base_identity

    paths = RunPaths.of(cfg)
    out, ti = paths.textual_inversion, cfg.textual_inversion
    concepts = list(concepts) if concepts is not None else class_concepts(labelled, ti.initializer)
    check_concepts(concepts, labelled)
    acc = accelerator if accelerator is not None else make_accelerator()
    record = trained_on(cfg, labelled, concepts, base_identity(base, cfg.model), resolution, str(acc.mixed_precision))
    info = read_info(out)
    if info is not None:
        _refuse_other(info["trained_on"], record, out / INFO_FILE, out)
        done = (out / EMBEDS_FILE).is_file() and file_fingerprint(out / EMBEDS_FILE) == info["embeddings_fingerprint"]
        if done and int(info["steps"]) == ti.steps:
            log.info("textual inversion: reusing %s (%d steps)", out, ti.steps)
            return out
        if int(info["steps"]) > ti.steps:
            raise MVCError(f"{out} holds embeddings trained for {info['steps']} steps, more than "
                           f"textual_inversion.steps={ti.steps}; raise it back, or delete {out} to train anew")
        if not done:
            log.warning("textual inversion: %s is missing or changed; writing it again", out / EMBEDS_FILE)
    components = load_base(cfg, None, paths.root, source=base)
    train_textual_inversion(cfg, components, labelled, concepts, out, record, resolution, base, acc, progress)
    return out


class InversionTask(Task):
    """Textual inversion for `engine.train`: B rows a step, the concepts in turn, every process the same global
    batch (its rows kept); the loss is its rows' share of the global mean and the vectors' gradient is summed over
    processes, so every process takes the same step. The frozen base never changes; only `vectors` trains."""
    kind, label, prefix, step_role = KIND, "textual inversion", "textual_inversion/", "textual_inversion.step"
    error_prefix, nonfinite_fix = "textual inversion: ", "lower textual_inversion.lr"

    def __init__(self, cfg: Any, components: dict, labelled: Any, concepts: Sequence[PlaceholderConcept],
                 out_dir: Path, record: dict, resolution: int, base: str, acc: Any, progress: bool):
        ti = cfg.textual_inversion
        self.cfg, self.components, self.labelled, self.concepts, self.acc = cfg, components, labelled, concepts, acc
        self.out_dir, self.record, self.resolution, self.base = out_dir, record, resolution, base
        self.B, self.images_per_step = ti.batch_size, ti.batch_size
        self.keep = shard_rows(self.B, acc.num_processes, acc.process_index, "textual_inversion.batch_size")
        self.run = _setup(cfg, components, labelled, concepts, resolution, acc, progress)
        self.vectors = self.run.vectors
        self.params = [self.vectors]
        self.optimizer = torch.optim.Adam([self.vectors], lr=ti.lr)  # a constant rate, no clipping
        self.seed = None  # the checkpoint's, or run.seed (resolved once for every process)

    def restore(self, ckpt: dict | None) -> None:
        ti = self.cfg.textual_inversion
        if ckpt is None:
            self.seed = broadcast_seed(self.acc, self.cfg.run.seed)
            return
        step = int(ckpt["step"])
        if step > ti.steps:
            raise MVCError(f"{self.out_dir / 'checkpoints'} holds a run at step {step}, beyond textual_inversion.steps="
                           f"{ti.steps}; raise it back, or delete {self.out_dir} to train anew")
        with torch.no_grad():
            self.vectors.copy_(ckpt["vectors"].to(self.vectors))
        self.seed = int(ckpt["seed"])
        log.info("textual inversion: continuing from step %d", step)

    def state(self) -> dict:
        return {"vectors": self.vectors.detach().cpu().clone(), "seed": self.seed}

    def loss(self, step: int, micro: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's rows of the step's global batch through the frozen base, the learned vectors in place."""
        run, keep, B, dev = self.run, self.keep, self.B, self.acc.device
        T, sched = len(self.cfg.textual_inversion.templates), self.components["scheduler"]
        d = draw_concept_rows(step, B, [len(c.indices) for c in self.concepts], T, tuple(run.latents.mean.shape[2:]),
                              sched.config.num_train_timesteps, generator)  # the global batch, on every process
        img = torch.stack([run.members[c][i] for c, i in zip(d.concept.tolist(), d.image.tolist())])[keep]
        z = (run.latents.mean[img, 0] + run.latents.std[img, 0] * d.eps[keep]) * run.latents.scaling_factor
        p = (d.concept * T + d.template)[keep]  # (b,) prompt rows
        with self.acc.autocast():
            embeds = encode_learned(self.components["text_encoder"], run.name, run.weight, run.rows, self.vectors,
                                    run.prompt_ids[p].to(dev), run.prompt_mask[p].to(dev))  # (b, L, D)
            per_sample = noise_prediction_loss(self.components["unet"], sched, z.to(dev), embeds,
                                               d.noise[keep].to(dev), d.timesteps[keep].to(dev))  # (b,)
        local = per_sample.sum()
        return local / B, self.acc.reduce(local.detach().clone(), reduction="sum") / B  # its share of the mean

    def after_backward(self) -> None:
        if self.acc.num_processes > 1:  # every process gets the global batch's gradient: the vectors stay equal
            self.vectors.grad = self.acc.reduce(self.vectors.grad, reduction="sum")

    def scalars(self, record: Any) -> dict:
        return {"loss": float(record), "vector_norm": self.vectors.detach().norm(dim=1).mean().item()}

    def setup_scalars(self) -> dict:
        return {"cache_seconds": self.run.cache_s, "concepts": len(self.concepts), "images": self.run.num_images,
                "seed": self.seed, "world_size": self.acc.num_processes}

    def export(self, step: int, result: dict) -> None:
        _write_result(self.cfg, self.labelled, self.concepts, self.components["tokenizer"], self.out_dir,
                      self.record, self.resolution, self.base, self.vectors, step, self.seed, result["losses"],
                      self.run.cache_s, result["train_seconds"], result["images_per_s"])


def train_textual_inversion(cfg: Any, components: dict, labelled: Any, concepts: Sequence[PlaceholderConcept],
                            out_dir: Path, record: dict, resolution: int, base: str, accelerator: Any = None,
                            progress: bool = True) -> dict:
    """Learn the concepts' vectors on the frozen base `components` with `accelerator` (default: the stage's), on
    its device and with its mixed precision, data-parallel over its processes; continue from the newest checkpoint
    in `out_dir/checkpoints` when there is one (trained on `record`); the main process writes the embeddings and
    training.json. Returns {"losses": per-step global losses of this run, "step", "images_per_s"}."""
    ti, acc = cfg.textual_inversion, accelerator if accelerator is not None else make_accelerator()
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    task = InversionTask(cfg, components, labelled, concepts, out_dir, record, resolution, base, acc,
                         progress and acc.is_main_process)
    cadence = Cadence(ti.steps, ti.log_every, ti.checkpoint_every, ti.checkpoints_keep, log_at_checkpoints=True)
    return train(task, acc, out_dir, cadence, dataclasses.asdict(cfg), record,
                 resume="latest" if list_checkpoints(ckpt_dir) else None,
                 fix=f"restore those settings, or delete {out_dir} to train the embeddings anew", progress=progress)


@dataclass
class _Setup:
    """What the loop reads: the learned vectors, the frozen text encoder's embedding, the caches."""
    vectors: torch.Tensor      # (C * V, D) fp32, what trains
    rows: torch.Tensor         # (C * V,) their rows in the embedding
    weight: torch.Tensor       # (vocab, D) the embedding, never written
    name: str                  # its parameter name
    latents: Any               # LatentCache of the concept images, (M, 1, C, h, w)
    members: list              # per concept, its images' cache rows
    prompt_ids: torch.Tensor   # (C * T, L)
    prompt_mask: torch.Tensor  # (C * T, L)
    num_images: int
    cache_s: float


def _setup(cfg: Any, components: dict, labelled: Any, concepts: Sequence[PlaceholderConcept], resolution: int, acc: Any,
           progress: bool) -> _Setup:
    """Freeze the base on the accelerator's device (the U-Net in the compute dtype under mixed precision; the VAE
    and the text encoder in fp32), add the placeholder tokens, and cache the concept images' posteriors and the
    templates' token ids."""
    from mvc.diffusion.finetune import CACHE_DTYPES, encode_latents_cache
    from mvc.diffusion.finetune_setup import freeze
    from mvc.diffusion.sd_io import tokenize

    ti = cfg.textual_inversion
    unet, vae, text_encoder, tokenizer = (components[k] for k in ("unet", "vae", "text_encoder", "tokenizer"))
    if unet.config.in_channels != vae.config.latent_channels:
        raise MVCError(f"textual inversion needs a text-to-image base; this U-Net takes {unet.config.in_channels} "
                       "input channels (an InstructPix2Pix folder?)")

    # 1. Frozen components, placeholder tokens, the vectors' initial values.
    freeze(unet, vae, text_encoder)
    ids = add_placeholders(tokenizer, text_encoder, concepts, ti.num_vectors)  # (C, V)
    vae.to(acc.device)
    text_encoder.to(acc.device)
    unet.to(acc.device, CACHE_DTYPES.get(str(acc.mixed_precision), torch.float32))  # autocast computes in it anyway
    name = embedding_name(text_encoder)
    weight = text_encoder.get_input_embeddings().weight.detach()  # (vocab, D), never written again
    rows = ids.flatten().to(acc.device)  # (C * V,)
    vectors = weight[rows].clone().float().requires_grad_(True)  # (C * V, D), what trains

    # 2. One-off caches: the VAE posterior of every concept image, the token ids of every concept's templates.
    t0 = time.perf_counter()
    images = sorted({i for c in concepts for i in c.indices})
    pos = {i: k for k, i in enumerate(images)}
    latents = encode_latents_cache(vae, labelled.subset(images), resolution, show_progress=progress)
    members = [torch.tensor([pos[i] for i in c.indices]) for c in concepts]
    prompts = [concept_prompt(t, c.token) for c in concepts for t in ti.templates]
    prompt_ids, prompt_mask = tokenize(tokenizer, prompts)  # (C * T, L)
    _check_lengths(tokenizer, prompts + [concept_prompt(ti.prompt, c.token) for c in concepts])
    return _Setup(vectors, rows, weight, name, latents, members, prompt_ids, prompt_mask, len(images),
                  time.perf_counter() - t0)


def _write_result(cfg: Any, labelled: Any, concepts: Sequence[PlaceholderConcept], tokenizer: Any, out_dir: Path,
                  record: dict, resolution: int, base: str, vectors: torch.Tensor, step: int, seed: int,
                  losses: list[float], cache_s: float, train_s: float, ips: float) -> None:
    """The embeddings, then training.json (the mark of a finished result)."""
    ti = cfg.textual_inversion
    emb = vectors.detach().view(len(concepts), ti.num_vectors, -1)  # (C, V, D)
    save_learned_embeds(out_dir / EMBEDS_FILE, [c.token for c in concepts], emb)
    init_tokens = tokenizer.convert_ids_to_tokens([first_token_id(tokenizer, c.initializer) for c in concepts])
    atomic_write_json(out_dir / INFO_FILE, {
        "format": FORMAT_VERSION, "trained_on": record, "steps": step, "seed": seed, "base": base,
        "resolution": int(resolution), "num_vectors": ti.num_vectors, "templates": list(ti.templates),
        "concepts": [{"label": c.label, "class_name": labelled.classes[c.label], "token": c.token,
                      "tokens": vector_tokens(c.token, ti.num_vectors), "initializer": c.initializer,
                      "initializer_token": tok, "images": len(c.indices), "indices": list(c.indices)}
                     for c, tok in zip(concepts, init_tokens)],
        "embeddings": EMBEDS_FILE, "embeddings_fingerprint": file_fingerprint(out_dir / EMBEDS_FILE),
        "final_loss": float(np.mean(losses[-50:])) if losses else None,
        "seconds": {"cache": round(cache_s, 3), "train": round(train_s, 3)},
        "images_per_s": None if math.isnan(ips) else round(ips, 3)})


def _check_lengths(tokenizer: Any, prompts: Sequence[str]) -> None:
    """Refuse a template or prompt that the tokenizer's max length would cut (its learned tokens could be lost)."""
    from mvc.diffusion.sd_io import pipeline_texts

    budget = int(tokenizer.model_max_length)
    for p, text in zip(prompts, pipeline_texts(tokenizer, prompts)):
        if len(tokenizer(text).input_ids) > budget:  # BOS + tokens + EOS
            raise MVCError(f"textual inversion: the prompt {p!r} needs more than the tokenizer's {budget} tokens; "
                           "shorten it or lower textual_inversion.num_vectors")


#################################################################################
#                        Config rules (mvc.core.registry)                       #
#################################################################################

@config_rule("textual_inversion.templates")
def _training_templates(cfg: Any) -> None:
    from mvc.data.prompts import validate_template

    for t in cfg.textual_inversion.templates:
        validate_template(t, ("token",), EXAMPLE_TEMPLATE)


@config_rule("textual_inversion.prompt")
def _generation_prompt(cfg: Any) -> None:
    from mvc.data.prompts import validate_template

    validate_template(cfg.textual_inversion.prompt, ("token",), EXAMPLE_TEMPLATE)


@config_rule("textual_inversion.initializer")
def _initializer(cfg: Any) -> None:
    word = cfg.textual_inversion.initializer
    if word is not None and not word.strip():
        raise MVCError("give a word, or null for the class name")
