"""The generators of synthetic sets, one registry (`generate.method`): MVC and the baselines it is judged against.

`GENERATORS` is the one list of them; each registered class says in its docstring what it samples. Every
generator fills the same plan through the same loop (`mvc.generation.generate.generate_synthetic`), so every set
has one format; a generator (`SetGenerator`) says only what differs: the model it samples (`model_path`), the
settings that change its images, the parameters recorded with each image and how it renders a batch.
docs/generators.md tells the whole story.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mvc.core import seeds
from mvc.core.perf import DEFAULT_BATCH
from mvc.core.registry import Registry, config_rule, publish_choices
from mvc.core.utils import MVCError

log = logging.getLogger(__name__)


#################################################################################
#                                  Rendering                                    #
#################################################################################

SEED_ROLE = "generate.image"  # every method's per-image noise: seeds.generator(seed, SEED_ROLE, source, variant)
# whose caption an mvc prompt starts from (generate.caption_from); training's twin is train.prompt_from
CAPTION_FROM = ("source", "target")
publish_choices("caption source", CAPTION_FROM)


def caption_partners(sources: Sequence[int], caption_from: str, seed: int) -> list[int]:
    """Per source of one class, the position (in `sources`) of the image whose caption its prompt uses:
    itself ('source'), or another image of the class drawn from seeds.generator(seed, 'generate.caption',
    source) ('target'; a class of one image keeps its own)."""
    n = len(sources)
    if caption_from == "source" or n == 1:
        return list(range(n))
    out = []
    for p, s in enumerate(sources):
        k = int(torch.randint(n - 1, (), generator=seeds.generator(seed, "generate.caption", int(s))))
        out.append(k + (k >= p))  # uniform over the other n - 1 positions
    return out


def image_generators(seed: int, batch: Sequence[Any]) -> list[torch.Generator]:
    """One generator per image of a batch, from (seed, source, variant): independent of batching and sharding."""
    return [seeds.generator(seed, SEED_ROLE, j.source, j.variant) for j in batch]


def render(pipe, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor, cond_latents: torch.Tensor,
           generators: list[torch.Generator], num_inference_steps: int, guidance_scale: float,
           image_guidance_scale: float) -> list:
    """One IP2P pipeline call for a batch: (B, T, D) embeddings, (B, 4, h, w) condition latents, B generators -> B PIL images."""
    return pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, image=cond_latents,
                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                image_guidance_scale=image_guidance_scale, generator=generators, output_type="pil").images


def load_finetuned(model_dir: Any, sampler: str, device: Any = None, dtype: torch.dtype | None = None) -> Any:
    """The fine-tuned InstructPix2Pix pipeline as its conditioning needs it: with `caption_shape`, its U-Net wrapped
    with the ControlNet branch saved beside it (called as the U-Net is)."""
    from mvc.diffusion.conditioning import SHAPE, load_controlnet
    from mvc.diffusion.models import load_ip2p_pipeline, training_info, vae_scale_factor

    pipe = load_ip2p_pipeline(model_dir, sampler, device, dtype=dtype)
    if training_info(model_dir).get("conditioning") == SHAPE:
        pipe.unet = load_controlnet(model_dir, pipe.unet, vae_scale_factor(pipe.vae), device, dtype)
    return pipe


def resolve_resolution(g: Any, model_dir: Path, pipe: Any = None) -> int:
    """The sampling resolution of the fine-tuned model: `generate.resolution` (`g`: the generate section), else
    the one it was tuned at."""
    from mvc.diffusion.models import load_ip2p_pipeline, pipeline_resolution, training_info

    tuned = training_info(model_dir).get("resolution")
    if g.resolution is not None:
        if tuned and int(tuned) != int(g.resolution):
            log.warning("generating at generate.resolution=%d, but %s was fine-tuned at %d px",
                        g.resolution, model_dir, tuned)
        return int(g.resolution)
    if tuned:
        return int(tuned)
    if pipe is None:
        pipe = load_ip2p_pipeline(model_dir, g.scheduler)
    return pipeline_resolution(model_dir, pipe)


#################################################################################
#                                  The protocol                                 #
#################################################################################

class SetGenerator:
    """One method, bound to a config: what it samples, which settings change its images, and how it renders
    a batch of one class's jobs. `generate_synthetic` calls, in order: `check`, `model_path`, `resolution`,
    `settings`; then, when images are missing, `load`, `begin`, and per class `start_class` + `render`."""
    name = ""
    finetuned = False  # samples the fine-tuned IP2P folder (run train_mvc.py first)

    def __init__(self, cfg: Any, paths: Any = None):
        from mvc.core.paths import RunPaths

        self.cfg, self.g = cfg, cfg.generate
        self.paths = paths if paths is not None else RunPaths.of(cfg)  # where the run's files go
        self.batch_size = self.g.batch_size or DEFAULT_BATCH  # images per pipeline call (generate_synthetic sizes it)

    def ops(self) -> list[str]:
        """The op of variant v is ops[v % len(ops)] (the plan's `op` field)."""
        return ["none"]

    def needs_captions(self) -> bool:
        return False

    def check(self, labelled: Any) -> None:
        """Refuse, before any work, what this method cannot do with this labelled subset."""

    def model_path(self, labelled: Any, pool: Any = None, progress: bool = True, device: Any = None) -> str:
        """The folder (or hub id) this method samples; building it (on `device`) when it is the tiny base or
        learned embeddings."""
        raise NotImplementedError

    def shared_model_path(self, labelled: Any, pool: Any = None, progress: bool = True, device: Any = None,
                          main: bool = True, barrier: Any = None) -> str:
        """`model_path()` on every process: the main process first (it builds what is missing, e.g. the tiny base), then
        the others, which find it built (`barrier`: wait for every process)."""
        model = self.model_path(labelled, pool, progress, device) if main else None
        (barrier or (lambda: None))()
        return model if main else self.model_path(labelled, pool, progress, device)

    def resolution(self, model: str, pipe: Any = None) -> int:
        raise NotImplementedError

    def settings(self, model: str, labelled: Any, resolution: int) -> dict:
        """Everything that changes the images (not the set size, batch size or grids)."""
        raise NotImplementedError

    def load(self, model: str, device: Any, dtype: torch.dtype) -> Any:
        raise NotImplementedError

    def begin(self, pipe: Any, model: str, resolution: int) -> None:
        """Once per run before the first class: what every batch shares."""
        from mvc.diffusion.sd_io import encode_prompts

        self.neg = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""])  # (1, T, D): the pipelines' unconditional text
        self.params = self.record_params(model, resolution)

    def record_params(self, model: str, resolution: int) -> dict:
        """The method's sampling parameters, recorded with every image (top-level fields of its record)."""
        raise NotImplementedError

    def start_class(self, pipe: Any, labelled: Any, label: int, jobs: Sequence[Any], captions: dict | None,
                    resolution: int) -> Any:
        raise NotImplementedError

    def render(self, pipe: Any, state: Any, batch: Sequence[Any], seed: int,
               generators: list[torch.Generator]) -> tuple[list, list[dict]]:
        """B PIL images and, per image, the record fields beyond the plan's (prompt, caption, op_params...)."""
        raise NotImplementedError

    def finish(self) -> None:
        """After the last batch: warnings about what the run did."""


GENERATORS: Registry[type[SetGenerator]] = Registry("generate.method")
publish_choices("generator", GENERATORS)


def make_generator(cfg: Any, paths: Any = None) -> SetGenerator:
    """The generator `generate.method` names, bound to `cfg` (and its `RunPaths`, when the caller has them)."""
    return GENERATORS.get(cfg.generate.method)(cfg, paths=paths)


#################################################################################
#                       MVC (and MVC without mixing)                            #
#################################################################################

@GENERATORS.register("mvc")
class MVCGenerator(SetGenerator):
    """The paper's generator: the fine-tuned IP2P model on each source, its prompt mixed per variant."""
    name = "mvc"
    finetuned = True

    def ops(self) -> list[str]:
        return list(self.cfg.mixing.ops)

    @property
    def conditioning(self) -> str:
        """What the fine-tuned model reads (`train.conditioning`, recorded in its mvc_training.json)."""
        from mvc.diffusion.models import training_info

        return str(training_info(self.paths.final).get("conditioning", "caption"))

    def needs_captions(self) -> bool:
        return self.conditioning in ("caption", "caption_shape")

    def check(self, labelled: Any) -> None:
        from mvc.diffusion.conditioning import edits_missing_tokens
        from mvc.generation.mixing import check_donors, mixing_params

        check_donors(np.bincount(labelled.targets, minlength=len(labelled.classes)), labelled.classes, self.ops(),
                     mixing_params(self.cfg.mixing))
        if self.ops() != ["none"] and edits_missing_tokens(self.conditioning, self.cfg.mixing):
            raise MVCError(f"{self.paths.final} is conditioned on image embeddings ({self.conditioning}), which have "
                           "no token ids for mixing.coarse_stage=tokens to edit; set mixing.coarse_stage=embeds")

    def model_path(self, labelled: Any, pool: Any = None, progress: bool = True, device: Any = None) -> str:
        return str(self.paths.final)

    def resolution(self, model: str, pipe: Any = None) -> int:
        return resolve_resolution(self.g, Path(model), pipe)

    def mixing_settings(self) -> dict:
        return dataclasses.asdict(self.cfg.mixing)

    def settings(self, model: str, labelled: Any, resolution: int) -> dict:
        cfg, g = self.cfg, self.g
        return {"method": self.name, "model_dir": str(Path(model).resolve()), "data": labelled.fingerprint(),
                "classes": list(labelled.classes), "captioner": cfg.captions.captioner,
                "prompt_template": cfg.captions.prompt_template, "mixing": self.mixing_settings(),
                "num_inference_steps": g.num_inference_steps, "guidance_scale": g.guidance_scale,
                "image_guidance_scale": g.image_guidance_scale, "scheduler": g.scheduler, "resolution": resolution,
                # named only when not the default, so sets made before the key existed keep their settings
                **({"caption_from": g.caption_from} if g.caption_from != "source" else {}),
                **({"conditioning": self.conditioning} if self.conditioning != "caption" else {})}

    def load(self, model: str, device: Any, dtype: torch.dtype) -> Any:
        return load_finetuned(model, self.g.scheduler, device, dtype)

    def begin(self, pipe: Any, model: str, resolution: int) -> None:
        from mvc.diffusion.sd_io import encode_ids
        from mvc.generation.mixing import mixing_params, parse_window

        super().begin(pipe, model, resolution)
        self.encode = lambda ids, mask: encode_ids(pipe.text_encoder, ids, mask)  # noqa: E731
        self.window, self.mix_params, self.clamped = parse_window(self.cfg.mixing.window), mixing_params(self.cfg.mixing), 0
        self.caption_ids: dict[int, str] = {}  # source -> the id of the image whose caption its prompt uses
        self.kind = self.conditioning

    def record_params(self, model: str, resolution: int) -> dict:
        g = self.g
        c = self.conditioning
        return {"guidance_scale": g.guidance_scale, "image_guidance_scale": g.image_guidance_scale,
                "num_inference_steps": g.num_inference_steps, "scheduler": g.scheduler, "resolution": resolution,
                "model_dir": str(model), **({"conditioning": c} if c != "caption" else {})}

    def start_class(self, pipe, labelled, label, jobs, captions, resolution):
        from mvc.diffusion.conditioning import IMAGE_CONDITIONINGS, PHOTO_INDEX_TEMPLATE, SHAPE, photo_index_captions
        from mvc.diffusion.sd_io import encode_conditions
        from mvc.generation.mixing import ClassPrompts

        sources = np.flatnonzero(np.asarray(labelled.targets) == label).tolist()
        ids = [str(labelled.ids[s]) for s in sources]
        if self.kind in IMAGE_CONDITIONINGS:  # every image of the class: a direction's partner may be any of them
            lat = encode_conditions(pipe.vae, [labelled.load_image(s) for s in sources], resolution, self.batch_size)
            return self.image_prompts(pipe, sources, ids, lat), {s: lat[i] for i, s in enumerate(sources)}
        template = self.cfg.captions.prompt_template
        if self.kind == "photo_index":  # "a photo i/n of type <class>": the image's number in its class
            captions, template = photo_index_captions(labelled), PHOTO_INDEX_TEMPLATE
        # the paper generates from the source's own caption; caption_from=target takes another image's, as in training
        partner = caption_partners(sources, self.g.caption_from, int(self.cfg.run.seed))
        self.caption_ids.update({s: ids[partner[p]] for p, s in enumerate(sources)})
        ctx = ClassPrompts.build(sources, ids, [captions[ids[k]] for k in partner], labelled.classes[label],
                                 template, self.window, pipe.tokenizer, self.encode)
        srcs = sorted({j.source for j in jobs})
        images = [labelled.load_image(s) for s in srcs]
        lat = encode_conditions(pipe.vae, images, resolution, self.batch_size)
        if self.kind == SHAPE:  # each source's edge map, what the ControlNet branch reads
            from mvc.diffusion.conditioning import shape_maps
            from mvc.diffusion.sd_io import images_to_tensor

            maps = shape_maps(images_to_tensor(images, resolution))
            return ctx, {s: lat[i] for i, s in enumerate(srcs)}, {s: maps[i] for i, s in enumerate(srcs)}
        return ctx, {s: lat[i] for i, s in enumerate(srcs)}  # condition latents, each (4, h, w)

    def image_prompts(self, pipe, sources: list[int], ids: list[str], lat: torch.Tensor):
        """The class's contexts under an image conditioning: each source's image embedding (image), or its
        direction to a partner of the class, E(partner) - E(source) (image_direction), with its mixing window."""
        from mvc.diffusion.conditioning import image_contexts, image_tokens, image_window, token_grid
        from mvc.diffusion.models import training_info
        from mvc.generation.mixing import ClassPrompts

        T, D = int(self.neg.shape[1]), int(self.neg.shape[2])
        grid = int(training_info(self.paths.final).get("image_grid") or token_grid(int(lat.shape[-1]), T))
        tok = image_tokens(lat, float(pipe.vae.config.scaling_factor), grid, D)  # (n, g*g, D)
        if self.kind == "image_direction":
            partner = caption_partners(sources, "target", int(self.cfg.run.seed))  # another image of the class
            self.caption_ids.update({s: ids[partner[p]] for p, s in enumerate(sources)})
            tok = tok[partner] - tok
        emb = image_contexts(tok.to(self.neg.device), self.neg[0])  # (n, T, D)
        win = self.window if isinstance(self.window, tuple) else image_window(grid)
        return ClassPrompts(list(sources), dict(zip(sources, ids)), {s: "" for s in sources}, {}, {},
                            {s: emb[i] for i, s in enumerate(sources)}, {s: win for s in sources},
                            not isinstance(self.window, tuple))

    def render(self, pipe, state, batch, seed, generators):
        from mvc.generation.mixing import mix_prompts

        ctx, cond, *shapes = state
        g = self.g
        embeds, op_ps, cl = mix_prompts(batch, ctx, self.mix_params, seed, self.encode,
                                        pipe.tokenizer.convert_ids_to_tokens)
        self.clamped += cl
        if shapes:  # the batch's edge maps, tiled by the U-Net over the guidance chunks
            if not hasattr(pipe.unet, "controlnet"):
                raise MVCError("this model was fine-tuned with a shape condition, but its pipeline was loaded without "
                               "its ControlNet branch; load it with mvc.generation.generators.load_finetuned")
            pipe.unet.shape = torch.stack([shapes[0][j.source] for j in batch])
        images = render(pipe, embeds, self.neg.expand(len(batch), -1, -1), torch.stack([cond[j.source] for j in batch]),
                        generators, g.num_inference_steps, g.guidance_scale, g.image_guidance_scale)
        fields = [{"op_params": op_p, "caption": ctx.captions[j.source]} for j, op_p in zip(batch, op_ps)]
        if self.kind == "image_direction":
            for f, j in zip(fields, batch):
                f["partner_id"] = self.caption_ids[j.source]  # the direction's other image
        elif self.g.caption_from != "source":
            for f, j in zip(fields, batch):
                f["caption_id"] = self.caption_ids[j.source]  # whose caption it is
        return images, fields

    def finish(self) -> None:
        if getattr(self, "clamped", 0):
            log.warning("%d variants had a caption window shorter than mixing.coarse_k/fine_m; k/m were lowered "
                        "to the window size (recorded in op_params)", self.clamped)


@GENERATORS.register("mvc_nomix")
class MVCNoMixGenerator(MVCGenerator):
    """The ablation that isolates mixing: the same fine-tuned model, sources and prompts, every variant unmixed."""
    name = "mvc_nomix"

    def ops(self) -> list[str]:
        return ["none"]

    def mixing_settings(self) -> dict:
        return {"ops": ["none"]}  # no other mixing key changes an unmixed image


#################################################################################
#                  The base, not fine-tuned: txt2img and img2img                #
#################################################################################

class BaseGenerator(SetGenerator):
    """The base pipeline sampled as it is (`model.base`; the tiny base on the tiny profile), prompted with the
    class prompt of `captions.prompt_template`, or with the whole prompt (the image's caption too) when
    `generate.caption` is set."""
    pipeline = ""  # the diffusers pipeline that samples the base (mvc.diffusion.models.BASE_PIPELINES)

    def needs_captions(self) -> bool:
        return bool(self.g.caption)

    def model_path(self, labelled: Any, pool: Any = None, progress: bool = True, device: Any = None) -> str:
        from mvc.diffusion.inputs import base_source

        if self.cfg.model.base == "tiny" and pool is None:
            from mvc.data import load_splits

            pool = load_splits(self.cfg.data)[1]
        return base_source(self.cfg, pool, self.paths.root, progress, device)

    def resolution(self, model: str, pipe: Any = None) -> int:
        from mvc.diffusion.models import base_resolution

        if self.g.resolution is not None:
            return int(self.g.resolution)
        if pipe is not None:
            return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
        return base_resolution(model, self.cfg.model.revision if self.cfg.model.base != "tiny" else None)

    def settings(self, model: str, labelled: Any, resolution: int) -> dict:
        from mvc.diffusion.models import base_identity

        cfg, g = self.cfg, self.g
        return {"method": self.name, **base_identity(model, cfg.model), "data": labelled.fingerprint(),
                "classes": list(labelled.classes), "use_caption": self.needs_captions(),
                "captioner": cfg.captions.captioner if self.needs_captions() else None,
                "prompt_template": cfg.captions.prompt_template, "num_inference_steps": g.num_inference_steps,
                "guidance_scale": g.guidance_scale, "scheduler": g.scheduler, "resolution": resolution,
                **self.extra_settings()}

    def extra_settings(self) -> dict:
        return {}

    def components(self, model: str) -> dict:
        """The components of the folder (or hub id) sampled."""
        from mvc.diffusion.inputs import load_base

        return load_base(self.cfg, None, self.paths.root, source=model)

    def load(self, model: str, device: Any, dtype: torch.dtype) -> Any:
        from mvc.diffusion.models import base_pipeline

        pipe = base_pipeline(self.components(model), self.pipeline, self.g.scheduler)
        if dtype != pipe.unet.dtype:
            pipe.to(dtype=dtype)
        return pipe.to(device) if device is not None else pipe

    def record_params(self, model: str, resolution: int) -> dict:
        g = self.g
        return {"guidance_scale": g.guidance_scale, "num_inference_steps": g.num_inference_steps,
                "scheduler": g.scheduler, "resolution": resolution, "use_caption": self.needs_captions(),
                "base": str(model),
                **self.extra_settings()}

    def prompts(self, labelled: Any, label: int, sources: Sequence[int], captions: dict | None) -> dict[int, str]:
        """Each source's prompt: the class prompt, or caption + class prompt (`captions.prompt_template`)."""
        from mvc.data.prompts import class_prompt, make_prompt

        template, name = self.cfg.captions.prompt_template, labelled.classes[label]
        if not self.needs_captions():
            return {s: class_prompt(template, name) for s in sources}
        return {s: make_prompt(template, captions[str(labelled.ids[s])], name) for s in sources}

    def start_class(self, pipe, labelled, label, jobs, captions, resolution):
        from mvc.diffusion.sd_io import encode_prompts

        srcs = sorted({j.source for j in jobs})
        prompts = self.prompts(labelled, label, srcs, captions)
        uniq = sorted(set(prompts.values()))
        emb = encode_prompts(pipe.tokenizer, pipe.text_encoder, uniq)  # (U, T, D), each distinct prompt once
        return {"prompts": prompts, "embeds": {s: emb[uniq.index(p)] for s, p in prompts.items()},
                "captions": {s: captions[str(labelled.ids[s])] for s in srcs} if self.needs_captions() else {}}

    def fields(self, state: dict, job: Any) -> dict:
        out = {"prompt": state["prompts"][job.source]}
        if self.needs_captions():
            out["caption"] = state["captions"][job.source]
        return out


@GENERATORS.register("txt2img")
class Txt2ImgGenerator(BaseGenerator):
    """Plain text-to-image with the base: what the paper argues MVC beats."""
    name = "txt2img"
    pipeline = "txt2img"

    def render(self, pipe, state, batch, seed, generators):
        from mvc.diffusion.models import sample_txt2img

        g = self.g
        embeds = torch.stack([state["embeds"][j.source] for j in batch])  # (B, T, D)
        images = sample_txt2img(pipe, embeds, self.neg.expand(len(batch), -1, -1), generators,
                                self.params["resolution"], g.num_inference_steps, g.guidance_scale)
        fields = [self.fields(state, j) for j in batch]
        if not self.needs_captions():  # nothing of one real image went in: no source (novelty, leakage checks skip it)
            for f in fields:
                f.update(source_id=None, source_index=None)
        return images, fields


@GENERATORS.register("img2img")
class Img2ImgGenerator(BaseGenerator):
    """SDEdit: each real image noised to `generate.strength` and denoised by the base with the class prompt."""
    name = "img2img"
    pipeline = "img2img"

    def extra_settings(self) -> dict:
        return {"strength": self.g.strength}

    def record_params(self, model: str, resolution: int) -> dict:
        return {**super().record_params(model, resolution),
                "denoising_steps": img2img_steps(self.g.num_inference_steps, self.g.strength)}

    def start_class(self, pipe, labelled, label, jobs, captions, resolution):
        from mvc.diffusion.sd_io import encode_posteriors

        state = super().start_class(pipe, labelled, label, jobs, captions, resolution)
        srcs = sorted({j.source for j in jobs})
        mean, std = encode_posteriors(pipe.vae, [labelled.load_image(s) for s in srcs], resolution, self.batch_size)
        state["posterior"] = {s: (mean[i:i + 1], std[i:i + 1]) for i, s in enumerate(srcs)}  # each (1, 4, h, w)
        return state

    def render(self, pipe, state, batch, seed, generators):
        from mvc.diffusion.sd_io import sample_init_latents

        g = self.g
        mean = torch.cat([state["posterior"][j.source][0] for j in batch])
        std = torch.cat([state["posterior"][j.source][1] for j in batch])
        init = sample_init_latents(pipe.vae, mean, std, generators)  # (B, 4, h, w), the pipeline's own draws
        embeds = torch.stack([state["embeds"][j.source] for j in batch])
        images = pipe(prompt_embeds=embeds, negative_prompt_embeds=self.neg.expand(len(batch), -1, -1), image=init,
                      strength=g.strength, num_inference_steps=g.num_inference_steps, guidance_scale=g.guidance_scale,
                      generator=generators, output_type="pil").images
        return images, [self.fields(state, j) for j in batch]


#################################################################################
#                   Textual inversion (DA-Fusion): img2img + tokens             #
#################################################################################

class TrainedTogether:
    """A generator whose model every process trains at once, data-parallel (textual inversion, DreamBooth)."""

    def shared_model_path(self, labelled: Any, pool: Any = None, progress: bool = True, device: Any = None,
                          main: bool = True, barrier: Any = None) -> str:
        """The main process first builds what the model trains from (the tiny base, the concepts' clusters); then
        every process calls `model_path()` together: all train (or all find the finished model)."""
        if main:
            self.concepts(labelled, pool, progress, device)
            BaseGenerator.model_path(self, labelled, pool, progress, device)
        (barrier or (lambda: None))()
        return self.model_path(labelled, pool, progress and main, device)


@GENERATORS.register("textual_inversion")
class TextualInversionGenerator(TrainedTogether, Img2ImgGenerator):
    """DA-Fusion: a token embedding learned per concept (`mvc.diffusion.textual_inversion`), then SDEdit from each real image
    with its concept's token in `textual_inversion.prompt`. `model_path()` is the folder of the learned embeddings
    (training them when missing); the base it names is what the img2img pipeline loads."""
    name = "textual_inversion"

    def needs_captions(self) -> bool:
        return False  # the prompt is the token's (generate.caption is not used)

    def concepts(self, labelled: Any, pool: Any = None, progress: bool = True, device: Any = None) -> list:
        """The concepts to learn: one per class, or with clustering-based sampling (`sampling.method=clusters`)
        one per kept cluster, each with its own token (`<mvc-class-3-c1>`) and its kept images."""
        from mvc.diffusion.clustering import training_concepts
        from mvc.diffusion.inputs import sampling_groups
        from mvc.diffusion.textual_inversion import TOKEN, PlaceholderConcept, class_concepts

        init = self.cfg.textual_inversion.initializer
        groups = sampling_groups(self.cfg, labelled, pool, device, progress)
        if groups is None:
            return class_concepts(labelled, init)
        return [PlaceholderConcept(label, TOKEN.format(label=label)[:-1] + f"-{suffix}>", tuple(idx),
                                   init or labelled.classes[label])
                for label, suffix, idx in training_concepts(groups, labelled.targets)]

    def model_path(self, labelled: Any, pool: Any = None, progress: bool = True, device: Any = None) -> str:
        from mvc.diffusion.textual_inversion import ensure_embeddings

        base = super().model_path(labelled, pool, progress, device)
        return str(ensure_embeddings(self.cfg, labelled, base, super().resolution(base),
                                     self.concepts(labelled, pool, progress, device), progress=progress))

    def info(self, model: str) -> dict:
        """`training.json` of the embeddings folder `model`."""
        from mvc.diffusion.textual_inversion import read_info

        info = read_info(model)
        if info is None:
            raise MVCError(f"no learned embeddings in {model}; generate with generate.method=textual_inversion "
                           "to train them")
        return info

    def resolution(self, model: str, pipe: Any = None) -> int:
        return int(self.info(model)["resolution"])  # trained at generate.resolution or the base's size

    def settings(self, model: str, labelled: Any, resolution: int) -> dict:
        from mvc.diffusion.textual_inversion import RESUME_FREE_KEYS

        info = self.info(model)
        ti = self.cfg.textual_inversion
        return {**super().settings(info["base"], labelled, resolution), "prompt_template": ti.prompt,
                "textual_inversion": {k: v for k, v in dataclasses.asdict(ti).items()
                                      if k not in RESUME_FREE_KEYS - {"steps"}},
                "embeddings": info["embeddings_fingerprint"]}

    def load(self, model: str, device: Any, dtype: torch.dtype) -> Any:
        from mvc.diffusion.textual_inversion import EMBEDS_FILE, load_learned_embeds

        pipe = super().load(self.info(model)["base"], device, dtype)
        load_learned_embeds(pipe, Path(model) / EMBEDS_FILE)
        return pipe

    def begin(self, pipe: Any, model: str, resolution: int) -> None:
        super().begin(pipe, model, resolution)
        self.learned = self.info(model)["concepts"]
        missing = [c["token"] for c in self.learned if c["token"] not in pipe.tokenizer.get_vocab()]
        if missing:
            raise MVCError(f"the pipeline lacks the learned token {missing[0]}; load {model} into it first "
                           "(mvc.diffusion.textual_inversion.load_learned_embeds)")

    def record_params(self, model: str, resolution: int) -> dict:
        from mvc.diffusion.textual_inversion import EMBEDS_FILE

        return {**super().record_params(self.info(model)["base"], resolution),
                "embeddings": str(Path(model) / EMBEDS_FILE)}

    def prompts(self, labelled: Any, label: int, sources: Sequence[int], captions: dict | None) -> dict[int, str]:
        from mvc.diffusion.textual_inversion import concept_prompt, source_tokens

        tokens = source_tokens(self.learned, labelled.targets)
        return {s: concept_prompt(self.cfg.textual_inversion.prompt, tokens[s]) for s in sources}

    def start_class(self, pipe, labelled, label, jobs, captions, resolution):
        from mvc.diffusion.textual_inversion import source_tokens

        state = super().start_class(pipe, labelled, label, jobs, captions, resolution)
        tokens = source_tokens(self.learned, labelled.targets)
        state["tokens"] = {s: tokens[s] for s in state["prompts"]}
        return state

    def fields(self, state: dict, job: Any) -> dict:
        return {**super().fields(state, job), "token": state["tokens"][job.source]}


def img2img_steps(num_inference_steps: int, strength: float) -> int:
    """Denoising steps img2img runs: diffusers' `get_timesteps`, int(steps * strength)."""
    return min(int(num_inference_steps * strength), num_inference_steps)


#################################################################################
#                                  DreamBooth                                   #
#################################################################################

@GENERATORS.register("dreambooth")
class DreamBoothGenerator(TrainedTogether, Txt2ImgGenerator):
    """Text-to-image with the DreamBooth model (`mvc.diffusion.dreambooth`), trained on first use: each source's variants
    are sampled from the instance prompt of its concept. `groups` ((label, labelled indices) per concept) replaces
    the default of one concept per class (a clustering pre-step passes them)."""
    name = "dreambooth"

    def __init__(self, cfg: Any, groups: Sequence[tuple[int, Sequence[int]]] | None = None, paths: Any = None):
        super().__init__(cfg, paths)
        self.groups = groups
        self._concepts: list | None = None

    def needs_captions(self) -> bool:
        return False

    def concepts(self, labelled: Any, pool: Any = None, progress: bool = True, device: Any = None) -> list:
        """The concepts (`mvc.diffusion.dreambooth.make_concepts`), built once: `groups`, else with clustering-based sampling
        (`sampling.method=clusters`) one per kept cluster with its kept images, else one per class."""
        from mvc.diffusion.dreambooth import make_concepts

        if self._concepts is None:
            groups = self.groups
            if groups is None and self.cfg.sampling.method != "none":
                from mvc.diffusion.clustering import training_concepts
                from mvc.diffusion.inputs import sampling_groups

                if pool is None and self.cfg.model.base == "tiny":  # base_vae embeds with the tiny base
                    from mvc.data import load_splits

                    pool = load_splits(self.cfg.data)[1]
                found = sampling_groups(self.cfg, labelled, pool, device, progress)
                groups = [(label, idx) for label, _suffix, idx in training_concepts(found, labelled.targets)]
            self._concepts = make_concepts(labelled, groups, self.cfg.dreambooth.identifiers)
        return self._concepts

    def check(self, labelled: Any) -> None:
        have = {c.label for c in self.concepts(labelled)}
        counts = np.bincount(labelled.targets, minlength=len(labelled.classes))
        missing = [labelled.classes[c] for c in np.flatnonzero(counts) if c not in have]
        if missing:
            raise MVCError(f"no DreamBooth concept for class {missing[0]!r} (and {len(missing) - 1} more): every "
                           "class with labelled images needs one to be generated")

    def model_path(self, labelled: Any, pool: Any = None, progress: bool = True, device: Any = None) -> str:
        from mvc.diffusion.dreambooth import get_dreambooth

        base = super().model_path(labelled, pool, progress, device)  # the tiny base is built first when it is missing
        return str(get_dreambooth(self.cfg, labelled, self.concepts(labelled, pool, progress, device), base, progress))

    def resolution(self, model: str, pipe: Any = None) -> int:
        return resolve_resolution(self.g, Path(model), pipe)  # the training resolution (mvc_training.json)

    def settings(self, model: str, labelled: Any, resolution: int) -> dict:
        from mvc.diffusion.models import training_info

        g = self.g
        return {"method": self.name, "model_dir": str(Path(model).resolve()),
                "dreambooth": training_info(model)["settings"], "data": labelled.fingerprint(),
                "classes": list(labelled.classes), "num_inference_steps": g.num_inference_steps,
                "guidance_scale": g.guidance_scale, "scheduler": g.scheduler, "resolution": resolution}

    def components(self, model: str) -> dict:
        from mvc.diffusion.models import load_pipeline_components

        return load_pipeline_components(model)  # our own folder: no hub revision or variant

    def record_params(self, model: str, resolution: int) -> dict:
        from mvc.diffusion.models import training_info

        info, g = training_info(model), self.g
        return {"guidance_scale": g.guidance_scale, "num_inference_steps": g.num_inference_steps,
                "scheduler": g.scheduler, "resolution": resolution, "model_dir": str(model),
                "training_steps": info["steps"], "lora_rank": info["lora_rank"],
                "train_text_encoder": info["train_text_encoder"], "prior_loss_weight": info["prior_loss_weight"]}

    def source_concepts(self, labelled: Any, label: int, sources: Sequence[int]) -> dict[int, int]:
        """Each source's concept: the one it belongs to; a source in none (a pre-step may leave images out) takes
        one of its class's concepts by its position (the same in every run and shard)."""
        concepts = self.concepts(labelled)
        member = {i: k for k, c in enumerate(concepts) for i in c.indices}
        own = [k for k, c in enumerate(concepts) if c.label == label]
        return {s: member.get(s, own[s % len(own)]) for s in sources}

    def prompts(self, labelled: Any, label: int, sources: Sequence[int], captions: dict | None) -> dict[int, str]:
        from mvc.data.prompts import instance_prompt

        concepts, template = self.concepts(labelled), self.cfg.dreambooth.instance_prompt
        return {s: instance_prompt(template, concepts[k].identifier, labelled.classes[label])
                for s, k in self.source_concepts(labelled, label, sources).items()}

    def start_class(self, pipe, labelled, label, jobs, captions, resolution):
        state = super().start_class(pipe, labelled, label, jobs, captions, resolution)
        concepts = self.concepts(labelled)
        of = self.source_concepts(labelled, label, sorted({j.source for j in jobs}))
        state["concept"] = {s: (k, concepts[k]) for s, k in of.items()}
        return state

    def fields(self, state: dict, job: Any) -> dict:
        k, c = state["concept"][job.source]
        return {"prompt": state["prompts"][job.source], "concept": k, "identifier": c.identifier,
                "concept_size": len(c.indices)}


#################################################################################
#                        Config rules (mvc.core.registry)                       #
#################################################################################

@config_rule("generate.strength", names_keys=True)
def _img2img_steps(cfg: Any) -> None:
    """Every SDEdit generator the config runs (generate.method, pipeline.generators) denoises at least one step."""
    g = cfg.generate
    sdedit = [m for m in (g.method, *cfg.pipeline.generators) if issubclass(GENERATORS.get(m), Img2ImgGenerator)]
    if sdedit and img2img_steps(g.num_inference_steps, g.strength) < 1:
        raise MVCError(f"config keys generate.strength={g.strength:g} x generate.num_inference_steps="
                       f"{g.num_inference_steps} give no img2img denoising step (int of the product) for "
                       f"{sdedit[0]}; raise either")
