"""Score images with a trained classifier checkpoint (used by generation's optional filter)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from mvc.core.checkpoint import list_checkpoints, load_checkpoint
from mvc.core.utils import MVCError
from mvc.data.images import IMAGE_EXTENSIONS, load_rgb, to_rgb

log = logging.getLogger(__name__)


@dataclass
class ClassifierBundle:
    """A trained classifier ready to score PIL images: model (eval mode, CPU), classes, preprocessing."""
    model: torch.nn.Module
    classes: list[str]
    preprocess: Callable  # PIL -> (3, S, S) float tensor, normalised
    meta: dict
    checkpoint: str
    kind: str = "classifier"  # "reference": the evaluation-only judge, which may never filter or select


def load_classifier(checkpoint: str | os.PathLike) -> ClassifierBundle:
    """Load a classifier checkpoint file (or a run folder / its checkpoints folder: the newest checkpoint)."""
    from mvc.classifier.augment import Augment, build_pre
    from mvc.classifier.models import ModelMeta, build_from_meta

    path = Path(checkpoint)
    if path.is_dir():
        cands = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
        if not cands:
            raise MVCError(f"no classifier checkpoint in {path}")
        path = cands[-1]
    elif not path.is_file():
        raise MVCError(f"classifier checkpoint not found: {path}")
    ckpt = load_checkpoint(path, kind=("classifier", "reference"))
    if "model_meta" not in ckpt or "model" not in ckpt:
        raise MVCError(f"{path} is not a classifier checkpoint (no model_meta); pass one from classifier/<run>/checkpoints")
    meta = ModelMeta.from_dict(ckpt["model_meta"])
    model = build_from_meta(meta)
    model.load_state_dict(ckpt["model"])
    model.eval()
    pre, norm = build_pre(meta), Augment(meta, "none")
    return ClassifierBundle(model, list(ckpt["classes"]), lambda im: norm(pre(to_rgb(im))[None])[0],
                            ckpt["model_meta"], str(path), str(ckpt.get("kind", "classifier")))


@torch.no_grad()
def predict_images(bundle: ClassifierBundle, images: Sequence, batch_size: int = 64) -> np.ndarray:
    """Softmax probabilities (N, C) float32 of PIL images, on the device the model is on."""
    device = next(bundle.model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.stack([bundle.preprocess(im) for im in images[i:i + batch_size]]).to(device)  # (B, 3, S, S)
        out.append(torch.softmax(bundle.model(x).float(), dim=1).cpu())
    if not out:
        return np.zeros((0, len(bundle.classes)), np.float32)
    return torch.cat(out).numpy()


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under `folder` (recursive), sorted: the row order of `predict` on a folder.

    Special files (FIFOs, devices, sockets) are skipped with a warning, never opened: reading a FIFO
    blocks until something writes to it."""
    root = Path(folder)
    if not root.is_dir():
        raise MVCError(f"image folder not found: {root}")
    named = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    special = [p for p in named if not p.is_file() and not p.is_dir()]
    if special:
        log.warning("skipping %d special file(s) (FIFO, device, socket or broken link): %s", len(special),
                    ", ".join(repr(str(p)) for p in special[:3]) + (" ..." if len(special) > 3 else ""))
    return [p for p in named if p.is_file()]


def predict(checkpoint: str | os.PathLike | ClassifierBundle, images, batch_size: int = 64) -> np.ndarray:
    """Probabilities (N, C) for a folder (rows in `list_images` order), a list of paths, or PIL images."""

    bundle = checkpoint if isinstance(checkpoint, ClassifierBundle) else load_classifier(checkpoint)
    if isinstance(images, (str, os.PathLike)):
        images = list_images(images)
    pil = [load_rgb(im) if isinstance(im, (str, os.PathLike)) else im for im in images]
    return predict_images(bundle, pil, batch_size)
