"""The evaluation-only reference classifier: trained once per dataset on its full training split, cached.

It judges synthetic images (label fidelity, and the feature space of diversity, Fréchet distance and
novelty). It is never used to train, filter or select anything: the classifier runs, generation and
its filter never read it. It is trained with the project's own classifier code (a timm backbone by
name, the same preprocessing, augmentation, engine and metrics as every classifier run) and cached
under `evaluate.cache_dir/<key>/`, the key covering the dataset's training split, the reference
settings and a recipe version, so every run and every generator of a dataset is judged by the same model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mvc.core import seeds
from mvc.core.utils import MVCError, atomic_write_json, fingerprint

log = logging.getLogger(__name__)

RECIPE_VERSION = 1
CHECKPOINT = "reference.pt"
INFO = "reference.json"


@dataclass
class Reference:
    """A trained reference: the model (eval mode), its preprocessing meta, classes and how it was made."""
    model: torch.nn.Module
    meta: Any
    classes: list[str]
    info: dict
    folder: Path


def reference_settings(ev: Any) -> dict:
    """The settings that change the reference (not where it is cached, nor batch sizes of evaluation)."""
    keys = ("reference_backbone", "reference_pretrained", "reference_input_size", "reference_epochs",
            "reference_batch_size", "reference_lr", "reference_augment", "reference_seed", "reference_channels_last")
    return {k: getattr(ev, k) for k in keys}


def reference_key(ev: Any, train: Any) -> str:
    """Cache key: the training split's fingerprint, the reference settings and the recipe version."""
    return fingerprint(RECIPE_VERSION, train.name, train.fingerprint(), reference_settings(ev))


def get_reference(ev: Any, train: Any, test: Any, accelerator: Any, progress: bool = True) -> Reference:
    """The reference of this dataset: loaded from the cache, else trained on `train` (every label) and
    measured on `test`. Call on every process (the main one trains first, the others then load)."""
    folder = Path(ev.cache_dir).expanduser() / reference_key(ev, train)
    with accelerator.main_process_first():
        if not (folder / INFO).is_file():
            if accelerator.is_main_process:
                _train(ev, train, test, folder, accelerator, progress)
    return read_reference_folder(folder)


def read_reference_folder(folder: str | Path) -> Reference:
    """A cached reference folder (checkpoint + reference.json)."""
    from mvc.classifier.models import ModelMeta, build_from_meta
    from mvc.core.checkpoint import load_checkpoint

    folder = Path(folder)
    try:
        info = json.loads((folder / INFO).read_text())
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict) or not (folder / CHECKPOINT).is_file():
        raise MVCError(f"{folder} is not a reference classifier folder; delete it to train the reference again")
    ckpt = load_checkpoint(folder / CHECKPOINT)
    meta = ModelMeta.from_dict(ckpt["model_meta"])
    model = build_from_meta(meta)
    model.load_state_dict(ckpt["model"])
    return Reference(model.eval(), meta, list(ckpt["classes"]), info, folder)


def _train(ev: Any, train: Any, test: Any, folder: Path, accelerator: Any, progress: bool) -> None:
    """Train the reference on every image of `train`, measure it on `test`, save it atomically."""
    from mvc.classifier.augment import Augment
    from mvc.classifier.data import eval_loader, plan_loader, prepared
    from mvc.classifier.engine import evaluate, train_one_epoch
    from mvc.classifier.metrics import compute_metrics
    from mvc.classifier.models import build_model
    from mvc.classifier.strategies import chunk
    from mvc.core.checkpoint import save_checkpoint
    from mvc.core.schedules import lr_multiplier
    from mvc.core.utils import atomic_dir

    t0 = time.time()
    seed = ev.reference_seed
    log.info("training the evaluation-only reference classifier (%s) on all %d training images of %s",
             ev.reference_backbone, len(train), train.name)
    with torch.random.fork_rng(devices=[]):
        seeds.seed_everything(seeds.derive_seed(seed, "evaluate", 0))
        model, meta = build_model(ev.reference_backbone, len(train.classes), ev.reference_pretrained, False,
                                  ev.reference_input_size, channels_last=ev.reference_channels_last)
        data = prepared(train, meta)
        augment = Augment(meta, ev.reference_augment)
        data.warm(progress=progress)  # every image pre-processed once (the epochs reuse the cache)
        opt = torch.optim.Adam(model.parameters(), lr=ev.reference_lr)
        model, opt = accelerator.prepare(model, opt)
        loss_fn = torch.nn.CrossEntropyLoss()
        rng = seeds.numpy_rng(seed, "evaluate", 1)
        history = []
        for epoch in range(ev.reference_epochs):
            batches = chunk(rng.permutation(len(data)).astype(np.int64), ev.reference_batch_size)
            loader = plan_loader(data, batches, 0, seeds.generator(seed, "evaluate", 2, epoch), augment)
            lr_at = lambda s, e=epoch, n=len(batches): ev.reference_lr * lr_multiplier(  # noqa: E731
                "cosine", e * n + s, ev.reference_epochs * n)
            stats = train_one_epoch(model, loader, opt, accelerator, loss_fn, lr_at, epoch, show_progress=progress)
            history.append({k: v for k, v in stats.items() if isinstance(v, (int, float))})
        y, p = evaluate(model, eval_loader(prepared(test, meta), meta, 256), accelerator)
        metrics = compute_metrics(y, p, len(train.classes))
    bare = accelerator.unwrap_model(model).eval()
    info = {"recipe_version": RECIPE_VERSION, "dataset": train.name, "train_fingerprint": train.fingerprint(),
            "train_images": len(train), "test_split": test.split, "test_images": len(test),
            "settings": reference_settings(ev), "test_accuracy": metrics["accuracy"],
            "test_per_class_accuracy": metrics["per_class_accuracy"], "classes": list(train.classes),
            "history": history, "seconds": round(time.time() - t0, 1),
            "note": "evaluation only: judges synthetic images; never trains, filters or selects anything"}
    with atomic_dir(folder) as tmp:
        save_checkpoint(tmp, 0, {"model": bare.state_dict(), "model_meta": meta.to_dict(), "classes": list(train.classes),
                                 "kind": "reference"}, {"evaluate": dataclasses.asdict(ev) if
                                                         dataclasses.is_dataclass(ev) else {}}, keep=0)
        next(tmp.glob("checkpoint-*.pt")).rename(tmp / CHECKPOINT)
        atomic_write_json(tmp / INFO, info)
    log.info("reference: %.1f%% on %s's %s split, %.0f s", 100 * metrics["accuracy"], train.name, test.split,
             info["seconds"])


@torch.no_grad()
def features_and_probs(ref: Reference, dataset: Any, batch_size: int = 256, device: Any = None,
                       progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The reference's pooled features (N, D) and softmax probabilities (N, C) of every image of `dataset`."""
    from tqdm.auto import tqdm

    from mvc.classifier.data import eval_loader, prepared

    model = ref.model.to(device) if device is not None else ref.model
    dev = next(model.parameters()).device
    feats, probs = [], []
    for x, _, _ in tqdm(eval_loader(prepared(dataset, ref.meta), ref.meta, batch_size), desc="reference features",
                        disable=not progress, leave=False):
        f = model.forward_features(x.to(dev))
        pooled = model.forward_head(f, pre_logits=True)  # (B, D)
        feats.append(pooled.float().cpu())
        probs.append(torch.softmax(model.forward_head(f).float(), 1).cpu())
    if not feats:
        return np.zeros((0, ref.model.num_features), np.float32), np.zeros((0, len(ref.classes)), np.float32)
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()
