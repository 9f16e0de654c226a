"""Seeds: one derivation with named roles, so every random draw of a run is independent and replayable.

Every generator of the project comes from `derive_seed(seed, role, *index)`: a hash of the base
seed, the role's name and the indices that tell draws of one role apart (a class, a step, an image).
Two roles never share a stream, and a draw does not move when another one is added or removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random

import numpy as np
import torch

# role -> what its indices are (the documentation of every random stream of the project)
ROLES = {
    "subset": "the labelled low-data subset; index: class",
    "val_split": "the val split held out of the remainder pool; index: class",
    "test_split": "the test split of a dataset that has none (caltech101); index: class",
    "pairs": "the (condition, target) index pairs; index: class (and group, with clustering-based sampling)",
    "sampling.kmeans": "the k-means initialisations of clustering-based sampling; index: class",
    "tiny.pool": "the tiny base's pretraining pool subsample",
    "tiny.init": "the tiny base's random initialisation",
    "tiny.vae": "the tiny VAE's pretraining draws",
    "tiny.unet": "the tiny U-Net's pretraining draws",
    "tiny.samples": "the tiny base's sample grid; index: sample",
    "finetune.order": "the fine-tuning pair order (epochs of permutations)",
    "finetune.step": "timesteps, noises, flips and dropout of one micro-batch; index: step, micro-step",
    "finetune.validation": "the validation grid's diffusion noise",
    "textual_inversion.step": "the concept images, templates, timesteps and noises of one textual-inversion step; "
                              "index: step",
    "dreambooth.prior": "DreamBooth's class (prior-preservation) image; index: class, image",
    "dreambooth.order": "DreamBooth's order of instance (index 0) and class images (index 1): epochs of permutations",
    "dreambooth.init": "the random initialisation of DreamBooth's LoRA adapters",
    "dreambooth.step": "timesteps, noises and posterior draws of one DreamBooth step; index: step",
    "generate.image": "the diffusion noise of one synthetic image; index: source, variant",
    "generate.caption": "the image whose caption a source's prompt starts from (generate.caption_from=target); "
                        "index: source",
    "generate.mixing": "the mixing draw (donor, positions, slices) of one synthetic image; index: source, variant",
    "classifier.init": "a classifier's weight initialisation",
    "classifier.epoch": "augmentation and dropout of one classifier epoch; index: rank, epoch",
    "classifier.loader": "the DataLoader workers of one classifier epoch; index: rank, epoch",
    "classifier.plan": "a strategy's batches of one epoch; index: epoch (role suffix: the strategy's stream)",
    "classifier.select": "the synthetic images a classifier run uses",
    "classifier.test_subset": "the fixed class-balanced test subset",
    "classifier.val": "the classifier's validation hold-out",
    "classifier.folds": "the k-fold split",
    "evaluate": "the synthetic-set evaluation (reference training, feature subsets)",
    "diagnose": "the base's text-to-image samples of the generator diagnosis; index: image",
    "process": "the global RNGs of one process; index: rank",
}


def _check_role(role: str) -> None:
    base = role.split(":", 1)[0]
    if base not in ROLES:
        raise ValueError(f"unknown seed role {role!r}; add it to mvc.core.seeds.ROLES")


def derive_seed(seed: int, role: str, *index: int) -> int:
    """A 63-bit seed for the draw `role` (a name from `ROLES`, optionally `name:suffix`) at `index`."""
    _check_role(role)
    key = json.dumps([int(seed), role, *[int(i) for i in index]]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & 0x7FFFFFFFFFFFFFFF


def generator(seed: int, role: str, *index: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator for one draw (see `derive_seed`)."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, role, *index))


def numpy_rng(seed: int, role: str, *index: int) -> np.random.Generator:
    """A numpy Generator for one draw (see `derive_seed`)."""
    return np.random.default_rng(derive_seed(seed, role, *index))


def resolve_seed(seed: int | None) -> int:
    """Return `seed`, or draw a fresh one from the OS when it is None (so it can still be logged)."""
    return int(seed) if seed is not None else int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices): the global RNGs that initialisation and libraries use."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: seed numpy/random from torch's per-worker seed."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)
