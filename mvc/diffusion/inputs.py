"""What the diffusion stages start from, for training and generation alike: the base model (the tiny base built
from the remainder pool, or a hub id / local diffusers folder) and, with sampling.method=clusters, the concept
groups of clustering-based sampling (`mvc.diffusion.clustering`)."""

from __future__ import annotations

from pathlib import Path

from mvc.core.utils import MVCError


def sampling_groups(cfg, labelled, pool, device=None, progress: bool = True):
    """The concepts of clustering-based sampling (`mvc.diffusion.clustering.ConceptGroups`), None when
    sampling.method=none; the base_vae embedder embeds with the base's VAE (the tiny base built if needed)."""
    from mvc.core.paths import RunPaths
    from mvc.diffusion.clustering import BASE_VAE, concept_groups

    if cfg.sampling.method == "none":
        return None
    base = None
    if cfg.sampling.embedder == BASE_VAE:
        base = base_source(cfg, pool, RunPaths.of(cfg).root, progress, device)
    return concept_groups(cfg, labelled, base, device)


def base_source(cfg, pool, output_dir: Path, progress: bool = True, device=None, precision: str | None = None) -> str:
    """What MVC fine-tunes: the tiny base's folder (built from the remainder `pool` on `device` with mixed
    `precision`, default the running stage's accelerate precision; or taken from its cache), else `model.base`
    (a hub id or a local diffusers folder)."""
    if cfg.model.base != "tiny":
        return cfg.model.base
    from mvc.core.distributed import stage_precision
    from mvc.diffusion.tiny import get_tiny_base

    if pool is None or len(pool) == 0:
        raise MVCError("model.base=tiny pretrains on the remainder pool, which is empty: lower data.k_per_class "
                       "(it must leave training images outside the labelled subset) or give a pretrained base")
    return str(get_tiny_base(cfg.tiny, pool, output_dir=output_dir, device=device, progress=progress,
                             precision=precision or stage_precision()))


def load_base(cfg, pool, output_dir: Path, progress: bool = True, source: str | None = None) -> dict:
    """The base's unet, vae, text_encoder, tokenizer and scheduler (U-Net not yet widened), from
    `source` (default: `base_source`)."""
    from mvc.diffusion.models import load_pipeline_components

    source = source or base_source(cfg, pool, output_dir, progress)
    if cfg.model.base == "tiny":
        return load_pipeline_components(source)
    return load_pipeline_components(source, revision=cfg.model.revision, variant=cfg.model.variant)
