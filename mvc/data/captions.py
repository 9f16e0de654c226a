"""Captioners and the per-image caption cache (prompts are built by `mvc.data.prompts`).

A captioner is a callable `captioner(images: list[PIL.Image]) -> list[str]` with a `name`; the registry
`CAPTIONERS` lists them (`captions.captioner`), each class saying what it is. Captions are cached in one
JSON-lines file per (captioner, dataset) — `{"id", "caption"}` per line — written a batch at a time, so a
rerun reuses it and an interrupted run resumes. Heavy libraries are imported inside the builders, so
`list_captioners()` stays cheap.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mvc.core.registry import Registry, publish_choices
from mvc.core.utils import MVCError, append_jsonl, fingerprint, read_jsonl, safe_name

log = logging.getLogger(__name__)

# name -> builder(captions_cfg, device) -> captioner
CAPTIONERS: Registry[Callable[..., "Captioner"]] = Registry("captioner")
publish_choices("captioner", CAPTIONERS)

def list_captioners() -> list[str]:
    """Names of the registered captioners (cheap: no model is loaded)."""
    return CAPTIONERS.names()


class Captioner:
    """Base class: `name` plus `__call__(images) -> captions` (one caption per PIL image)."""

    name = "captioner"

    @property
    def cache_key(self) -> str:
        """Names the caption cache: the captioner plus every setting that changes its captions."""
        return self.name

    def __call__(self, images: Sequence[Any]) -> list[str]:
        raise NotImplementedError

    def describe(self) -> dict:
        """Name, cache key, and the device and dtype it runs in (None for captioners without a model)."""
        device, dtype = getattr(self, "device", None), getattr(self, "dtype", None)
        return {"captioner": self.name, "cache_key": self.cache_key, "device": None if device is None else str(device),
                "dtype": None if dtype is None else str(dtype).replace("torch.", "")}


def build_captioner(captions_cfg: Any, device: Any = None) -> Captioner:
    """Build the captioner named by `captions_cfg.captioner` (`device`: a torch device, default CPU)."""
    return CAPTIONERS.get(captions_cfg.captioner)(captions_cfg, device)


#################################################################################
#                                 Caption cache                                 #
#################################################################################

def caption_cache_path(output_dir: str | os.PathLike, captioner: Captioner | str, dataset: Any) -> Path:
    """`<output_dir>/captions/<captioner cache_key>-<dataset fingerprint>.jsonl` (shared by every stage).

    The key holds the captioner's settings (BLIP-2's model and length, the template's text), so
    changing them captions afresh instead of reusing another model's captions.
    """
    key = captioner if isinstance(captioner, str) else captioner.cache_key
    return Path(output_dir) / "captions" / f"{safe_name(key)}-{dataset.fingerprint()}.jsonl"


def load_captions(cfg: Any, dataset: Any, progress: bool = True, device: Any = None, rank: int = 0, world: int = 1,
                  barrier: Callable[[], None] | None = None) -> dict[str, str]:
    """Captions of `dataset` by the configured captioner, from the shared cache under
    `<run.output_dir>/captions/` (captioning only what is missing). Every stage calls this.

    The captioner runs on `device` (BLIP-2 in fp16 on CUDA). With `world` processes, every one of them
    must call this (with `barrier`, e.g. `accelerator.wait_for_everyone`): each captions its share of
    the missing images, and every process returns all the captions.
    """
    captioner = build_captioner(cfg.captions, device)
    path = caption_cache_path(cfg.run.output_dir, captioner, dataset)
    caps = caption_dataset(dataset, captioner, path, cfg.captions.batch_size, progress=progress and rank == 0,
                           rank=rank, world=world, barrier=barrier)
    if device is not None:
        from accelerate.utils import release_memory

        del captioner
        release_memory()  # garbage-collect the captioner, empty the device cache: the stage's models come next
    return caps


def shard_files(cache_path: str | os.PathLike) -> list[Path]:
    """The per-process files of a sharded captioning run (`<cache stem>.rank<k>.jsonl`), merged at its end."""
    p = Path(cache_path)
    return sorted(p.parent.glob(f"{p.stem}.rank*.jsonl"))


def read_caption_files(paths: Sequence[Path]) -> dict[str, str]:
    """{id: caption} of caption files ({"id", "caption"} per line; a torn last line is skipped)."""
    cached: dict[str, str] = {}
    for path in paths:
        for rec in read_jsonl(path):
            if not isinstance(rec, dict) or "id" not in rec or not isinstance(rec.get("caption"), str):
                raise MVCError(f"{path}: a line is not a {{'id', 'caption'}} record; delete the file to recaption")
            cached[str(rec["id"])] = rec["caption"]
    return cached


def caption_dataset(dataset: Any, captioner: Captioner, cache_path: str | os.PathLike, batch_size: int = 16,
                    progress: bool = True, rank: int = 0, world: int = 1,
                    barrier: Callable[[], None] | None = None) -> dict[str, str]:
    """Captions of every image of `dataset`, `{id: caption}`, read from / appended to `cache_path`.

    Ids already in the cache are not captioned again, so a rerun is free and an interrupted
    run resumes where it stopped (a batch at a time). Lines for ids not in `dataset` are kept but
    not returned. With `world` processes (pass `barrier`), process `rank` captions every world-th
    missing image into its own shard file; after a barrier, rank 0 appends the shards to the cache
    and deletes them, and every process reads the whole cache. Shards left by an interrupted run
    count as cached and are merged by the next run, whatever its process count.
    """
    from tqdm.auto import tqdm

    barrier = barrier or (lambda: None)
    path = Path(cache_path)
    cached = read_caption_files([path, *shard_files(path)])
    todo = [i for i, id_ in enumerate(dataset.ids) if id_ not in cached]
    if world > 1:
        barrier()  # every process has read the same files before any of them writes
    mine = todo[rank::world]
    out = path if world == 1 else path.with_name(f"{path.stem}.rank{rank}.jsonl")
    if mine:
        log.info("captioning %d of %d images with %s%s -> %s", len(mine), len(dataset), captioner.name,
                 f" (rank {rank} of {world})" if world > 1 else "", out)
        bar = tqdm(total=len(mine), desc=f"captions ({captioner.name})", unit="img", disable=not progress)
        for start in range(0, len(mine), batch_size):
            idx = mine[start:start + batch_size]
            images = [dataset.load_image(i) for i in idx]
            caps = captioner(images)
            if len(caps) != len(idx):
                raise RuntimeError(f"captioner {captioner.name} returned {len(caps)} captions for {len(idx)} images")
            recs = [{"id": dataset.ids[i], "caption": " ".join(str(c).split())} for i, c in zip(idx, caps)]
            append_jsonl(out, *recs)  # one fsync per batch
            cached.update((r["id"], r["caption"]) for r in recs)
            bar.update(len(idx))
        bar.close()
    if world > 1 or shard_files(path):
        barrier()
        if rank == 0:
            merge_shards(path)
        barrier()
        cached = read_caption_files([path])
    return {id_: cached[id_] for id_ in dataset.ids}


def merge_shards(cache_path: Path) -> None:
    """Append the records of the shard files that the cache lacks, then delete the shards."""
    shards = shard_files(cache_path)
    have = read_caption_files([cache_path])
    new = [{"id": k, "caption": v} for k, v in read_caption_files(shards).items() if k not in have]
    if new:
        append_jsonl(cache_path, *new)
    for p in shards:
        p.unlink(missing_ok=True)


#################################################################################
#                          Captioners: template, attributes                     #
#################################################################################

class TemplateCaptioner(Captioner):
    """The same fixed text for every image."""

    name = "template"

    def __init__(self, text: str):
        self.text = text

    @property
    def cache_key(self) -> str:
        return f"{self.name}-{fingerprint(self.text)[:10]}"

    def __call__(self, images: Sequence[Any]) -> list[str]:
        return [self.text for _ in images]


@CAPTIONERS.register("template")
def _build_template(cfg: Any, device: Any = None) -> Captioner:
    return TemplateCaptioner(cfg.template_text)


# Thresholds of the attribute words. They are fixed numbers (not refit per dataset) chosen near
# the tertiles / medians of 2000 Fashion-MNIST training images at 28x28 (see `attribute_features`), so the
# words split that dataset into groups of similar size while meaning the same on any dataset.
ATTRIBUTE_THRESHOLDS = {
    "brightness": (0.57, 0.72),  # mean object intensity: dark < 0.57 <= gray < 0.72 <= bright
    "area": (0.375, 0.54),       # object fraction of the image: small < 0.375 <= medium < 0.54 <= large
    "aspect": (0.75, 1.10),      # bbox width / height: tall < 0.75 <= square < 1.10 <= wide
    "texture": 0.20,             # mean |finite difference| inside the object: smooth < 0.20 <= textured
    "asymmetry": 0.125,          # mean left-right mismatch of the bbox / its mean: symmetric < 0.125
}


def attribute_features(image: Any, max_size: int = 64) -> dict[str, float]:
    """Label-free measurements of one image: brightness, area, aspect, texture, asymmetry.

    The image is turned to grayscale in [0, 1] (shrunk, aspect kept, when larger than `max_size`;
    never enlarged, since interpolation would blur the edges unevenly); the background is the median
    of the border pixels, the object (foreground) the pixels that differ from it by more than 0.1.
    """
    from PIL import Image

    im = image.convert("L")
    if max(im.size) > max_size:
        r = max_size / max(im.size)
        im = im.resize((max(1, round(im.width * r)), max(1, round(im.height * r))), Image.BOX)
    g = np.asarray(im, dtype=np.float32) / 255.0  # (H, W)
    border = np.concatenate([g[0], g[-1], g[:, 0], g[:, -1]])
    bg = float(np.median(border))
    fg = np.abs(g - bg) > 0.1  # (S, S) bool
    if fg.sum() < 2:
        return {"brightness": float(g.mean()), "area": 0.0, "aspect": 1.0, "texture": 0.0, "asymmetry": 0.0}
    ys, xs = np.nonzero(fg)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    # brightness of the object itself (a dark item on a black background is still "dark")
    brightness = float(g[fg].mean())
    area = float(fg.mean())
    aspect = float((x1 - x0) / (y1 - y0))
    # texture: mean absolute finite difference inside the object, borders of the object excluded
    gy, gx = np.abs(np.diff(g, axis=0))[:, :-1], np.abs(np.diff(g, axis=1))[:-1, :]
    inner = fg[:-1, :-1] & fg[1:, :-1] & fg[:-1, 1:]
    texture = float((gx + gy)[inner].mean()) if inner.any() else 0.0
    # symmetry: compare the object's bounding box with its mirror image
    crop = g[y0:y1, x0:x1]
    asymmetry = float(np.abs(crop - crop[:, ::-1]).mean() / max(crop.mean(), 1e-3) / 2)
    return {"brightness": brightness, "area": area, "aspect": aspect, "texture": texture, "asymmetry": asymmetry}


def attribute_words(feats: dict[str, float]) -> list[str]:
    """The words true of an image's `attribute_features`, in a fixed order."""
    t = ATTRIBUTE_THRESHOLDS
    b, a, r = feats["brightness"], feats["area"], feats["aspect"]
    return [
        "dark" if b < t["brightness"][0] else "gray" if b < t["brightness"][1] else "bright",
        "small" if a < t["area"][0] else "medium" if a < t["area"][1] else "large",
        "tall" if r < t["aspect"][0] else "square" if r < t["aspect"][1] else "wide",
        "smooth" if feats["texture"] < t["texture"] else "textured",
        "symmetric" if feats["asymmetry"] < t["asymmetry"] else "asymmetric",
    ]


class AttributeCaptioner(Captioner):
    """Deterministic, label-free captions from pixel statistics: "a dark small tall smooth symmetric object"."""

    name = "attributes"

    def __call__(self, images: Sequence[Any]) -> list[str]:
        return ["a " + " ".join(attribute_words(attribute_features(im))) + " object" for im in images]


@CAPTIONERS.register("attributes")
def _build_attributes(cfg: Any = None, device: Any = None) -> Captioner:
    return AttributeCaptioner()


#################################################################################
#                          Captioners: BLIP-2 (transformers)                    #
#################################################################################

def _check_model_source(model_id: str, what: str) -> None:
    """A path-like id that does not exist is a user error (not a hub lookup)."""
    p = Path(model_id).expanduser()
    looks_local = model_id.startswith((".", "/", "~")) or model_id.count("/") > 1 or p.exists()
    if looks_local and not p.is_dir():
        raise MVCError(f"{what}: no folder {model_id!r}; give a local model folder or a hub id like 'owner/name'")


class Blip2Captioner(Captioner):
    """BLIP-2 (`Blip2ForConditionalGeneration`), greedy decoding, batched; fp16 on CUDA, fp32 on CPU
    unless `dtype` names another (captions.dtype).

    The model is loaded on first use, so a stage whose captions are all cached never loads it.
    """

    name = "blip2"

    def __init__(self, model_id: str, max_new_tokens: int = 30, device: Any = None, dtype: str | None = None):
        import torch

        from mvc.core.distributed import resolve_dtype

        _check_model_source(model_id, "captions.model_id")
        self.model_id = model_id
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = resolve_dtype(dtype, self.device, "captions.dtype")
        self.max_new_tokens = max_new_tokens
        self._model = self._processor = None

    @property
    def cache_key(self) -> str:
        return f"{self.name}-{fingerprint(self.model_id, self.max_new_tokens)[:10]}"

    def load(self) -> "Blip2Captioner":
        """Load processor and model (once); an unloadable source is a one-line MVCError."""
        if self._model is not None:
            return self
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        p = Path(self.model_id).expanduser()
        src = str(p) if p.is_dir() else self.model_id
        try:
            processor = Blip2Processor.from_pretrained(src)
            model = Blip2ForConditionalGeneration.from_pretrained(src, dtype=self.dtype, trust_remote_code=False)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MVCError(f"cannot load BLIP-2 from {self.model_id!r} ({first}); without network set a local "
                           f"folder in captions.model_id (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')})") from None
        self._processor, self._model = processor, model.to(self.device).eval()
        return self

    @property
    def model(self) -> Any:
        return self.load()._model

    @property
    def processor(self) -> Any:
        return self.load()._processor

    def __call__(self, images: Sequence[Any]) -> list[str]:
        import torch

        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, self.dtype)  # (B, 3, H, W)
        with torch.inference_mode():
            out = self.model.generate(pixel_values=pixel_values, do_sample=False, num_beams=1,
                                      max_new_tokens=self.max_new_tokens)
        # the prompt (query placeholders + BOS) is special tokens, so skipping them leaves the caption
        return [t.strip() for t in self.processor.batch_decode(out, skip_special_tokens=True)]


@CAPTIONERS.register("blip2")
def _build_blip2(cfg: Any, device: Any = None) -> Captioner:
    return Blip2Captioner(cfg.model_id, max_new_tokens=cfg.max_new_tokens, device=device,
                          dtype=getattr(cfg, "dtype", None))


#################################################################################
#                           Captioners: BLIP-2 (LAVIS)                          #
#################################################################################

class LavisCaptioner(Captioner):
    """BLIP-2 OPT through salesforce-lavis (the paper's code path); captions in its own environment.

    salesforce-lavis cannot be installed beside this stack (docs/lavis.md), so the hand-off is the
    caption file: `caption_mvc.py --captions.captioner=lavis` in the LAVIS environment writes it, and
    the main stack, run with the same settings, reads it as a cache hit. Building this captioner
    therefore needs no lavis; only captioning a missing image does (a one-line error here).
    """

    name = "lavis"

    def __init__(self, model_name: str, model_type: str, max_new_tokens: int = 30, device: Any = None):
        import torch

        self.model_name, self.model_type = model_name, model_type
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.max_new_tokens = max_new_tokens
        self.model = self.vis_processors = None

    @property
    def cache_key(self) -> str:
        return f"{self.name}-{fingerprint(self.model_name, self.model_type, self.max_new_tokens)[:10]}"

    def __call__(self, images: Sequence[Any]) -> list[str]:
        import importlib.util

        import torch

        if self.model is None:
            if importlib.util.find_spec("lavis") is None:
                raise MVCError("captioner 'lavis': images without a caption in the cache, and "
                               "salesforce-lavis is not installed here (it pins transformers<4.27 and cannot live "
                               "beside this stack): run caption_mvc.py with the same config in the LAVIS environment "
                               "first (requirements-lavis.txt, docs/lavis.md), or use captions.captioner=blip2")
            from lavis.models import load_model_and_preprocess

            self.model, self.vis_processors, _ = load_model_and_preprocess(
                name=self.model_name, model_type=self.model_type, is_eval=True, device=self.device)
        batch = torch.stack([self.vis_processors["eval"](im.convert("RGB")) for im in images]).to(self.device)
        with torch.inference_mode():
            caps = self.model.generate({"image": batch}, use_nucleus_sampling=False, num_beams=1,
                                       max_length=self.max_new_tokens)
        return [c.strip() for c in caps]


@CAPTIONERS.register("lavis")
def _build_lavis(cfg: Any, device: Any = None) -> Captioner:
    return LavisCaptioner(cfg.lavis_model, cfg.lavis_model_type, max_new_tokens=cfg.max_new_tokens, device=device)
