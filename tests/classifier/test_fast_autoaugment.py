"""Fast AutoAugment: the published policy tables, the ops' contract, seeding, and a classifier run with it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mvc.classifier.fast_autoaugment import OP_RANGES, FastAutoAugment, apply_op, magnitude
from mvc.classifier.fast_autoaugment_policies import POLICIES
from mvc.core.config import load_yaml, make_config
from tests.classifier.test_classifier import make_splits, tiny_cfg

ROOT = Path(__file__).resolve().parents[2]
# sub-policies in the authors' archive: fa_reduced_cifar10, fa_resnet50_rimagenet, fa_reduced_svhn
PUBLISHED_COUNTS = {"cifar10": 493, "imagenet": 498, "svhn": 497}


def test_policy_tables_are_the_published_ones_and_well_formed():
    assert {k: len(v) for k, v in POLICIES.items()} == PUBLISHED_COUNTS
    for name, policy in POLICIES.items():
        assert len(set(policy)) == len(policy), name  # no sub-policy listed twice
        for sub in policy:
            assert len(sub) == 2, sub
            for op, p, level in sub:
                assert op in OP_RANGES and 0.0 <= p <= 1.0 and 0.0 <= level <= 1.0, (name, op, p, level)
        assert {op for sub in policy for op, _, _ in sub} == set(OP_RANGES), name  # all 15 ops are searched
    # spot checks against the published file (first sub-policy of each)
    assert POLICIES["cifar10"][0] == (("Contrast", 0.8320659688593578, 0.49884310562180767),
                                      ("TranslateX", 0.41849883971249136, 0.394023086494538))
    assert POLICIES["imagenet"][0] == (("ShearY", 0.14143816458479197, 0.513124791615952),
                                       ("Sharpness", 0.9290316227291179, 0.9788406212603302))


def test_levels_map_linearly_onto_the_papers_ranges():
    assert magnitude("Rotate", 0.0) == -30.0 and magnitude("Rotate", 1.0) == 30.0 and magnitude("Rotate", 0.5) == 0
    assert magnitude("Posterize", 0.0) == 4.0 and magnitude("Posterize", 1.0) == 8.0
    assert magnitude("Contrast", 0.5) == pytest.approx(1.0)  # the middle level leaves the image as it is
    assert magnitude("Cutout", 1.0) == pytest.approx(0.2) and magnitude("Equalize", 0.7) == 0.0


@pytest.mark.parametrize("op", sorted(OP_RANGES))
def test_every_op_keeps_shape_and_dtype_and_the_neutral_levels_change_nothing(op):
    x = torch.randint(0, 256, (3, 20, 24), dtype=torch.uint8)
    for level in (0.0, 0.3, 1.0):
        y = apply_op(x, op, level, torch.Generator().manual_seed(0))
        assert y.shape == x.shape and y.dtype == torch.uint8
    if op in ("Contrast", "Color", "Brightness", "Sharpness", "Rotate", "ShearX", "TranslateY"):
        assert torch.equal(apply_op(x, op, 0.5, torch.Generator().manual_seed(0)), x)  # magnitude 1x or 0
    if op in ("Invert", "Rotate", "Cutout", "Solarize"):
        assert not torch.equal(apply_op(x, op, 0.9, torch.Generator().manual_seed(0)), x)
    with pytest.raises(KeyError):
        apply_op(x, "Nope", 0.5)


def test_a_pil_image_keeps_its_size_and_mode():
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (18, 27, 3), dtype=np.uint8))
    for name in ("cifar10", "imagenet"):
        aug = FastAutoAugment(name, torch.Generator().manual_seed(0))
        for im in (rgb, rgb.convert("L")):
            outs = [aug(im) for _ in range(20)]
            assert all(o.size == im.size and o.mode == im.mode for o in outs)


def test_seeded_same_seed_same_images_other_seed_other_images():
    x = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))

    def run(seed: int) -> torch.Tensor:
        aug = FastAutoAugment("cifar10", torch.Generator().manual_seed(seed))
        return torch.stack([aug(im) for im in x])

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    # without a generator it draws from torch's global RNG, which the classifier's loader seeds per epoch
    aug = FastAutoAugment("imagenet")
    torch.manual_seed(3)
    a = torch.stack([aug(im) for im in x])
    torch.manual_seed(3)
    assert torch.equal(a, torch.stack([aug(im) for im in x]))


def test_unknown_policy_is_a_one_line_error():
    from mvc.core.utils import MVCError

    with pytest.raises(MVCError, match="cifar10, imagenet, svhn"):
        FastAutoAugment("mnist")


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_run_fast_autoaugment_with_the_policy_of_their_image_size(path):
    """Every profile runs Fast AutoAugment beside the classic baselines (but micro, the tests' profile, which runs
    no baseline); photos at 224 px take the ImageNet policies, small images the CIFAR ones."""
    cfg = make_config(load_yaml(path))
    if path.name != "micro.yaml":
        assert "real+fastautoaugment" in cfg.pipeline.runs
    big = (cfg.classifier.input_size or 224) >= 128
    assert cfg.classifier.autoaugment_policy == ("imagenet" if big else "cifar10")


def test_a_micro_classifier_run_trains_with_fast_autoaugment(tmp_path):
    from accelerate import Accelerator

    from mvc.classifier.train import run_all

    cfg = tiny_cfg(tmp_path, augment="fastautoaugment", epochs=3)
    records = run_all(cfg, Accelerator(cpu=True), splits=make_splits(n_train=8, n_test=9))
    r = records[0]
    assert Path(r["run_dir"]).name == "real-fastautoaugment-resnet10t-seed0"
    losses = [e["loss"] for e in r["history"]]
    assert len(losses) == 3 and all(np.isfinite(losses)) and r["last"]["accuracy"] >= 0.5, r["history"]
