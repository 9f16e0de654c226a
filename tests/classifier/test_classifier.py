"""Classifier training with synthetic data: strategies, metrics, training, resume, DDP, predict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mvc.classifier.engine import plan_lr
from mvc.classifier.metrics import compute_metrics
from mvc.classifier.strategies import STRATEGIES, build_strategy, chunk, list_strategies
from mvc.core.config import make_config
from mvc.core.schedules import lr_multiplier
from mvc.core.utils import MVCError, safe_name
from mvc.data import ArraySource, ImageDataset

ROOT = Path(__file__).resolve().parents[2]
COLORS = [(220, 30, 30), (30, 200, 30), (30, 30, 220)]
CLASSES = ["red thing", "green/thing", "blue"]  # names that need safe_name for folders


#################################################################################
#                                   Fixtures                                    #
#################################################################################

def FakeImages(n_per_class: int, seed: int, split: str, size: int = 16) -> ImageDataset:
    """An ImageDataset of noisy colour squares (class = colour)."""
    rng = np.random.default_rng(seed)
    targets = np.repeat(np.arange(len(CLASSES)), n_per_class).astype(np.int64)
    arr = np.stack([np.clip(np.array(COLORS[t])[None, None] + rng.normal(0, 25, (size, size, 3)), 0, 255)
                    for t in targets]).astype(np.uint8) if len(targets) else np.zeros((0, size, size, 3), np.uint8)
    return ImageDataset("colors", split, CLASSES, targets, [f"{split}/{i:05d}" for i in range(len(targets))],
                        ArraySource(arr))


def make_splits(n_train: int = 8, n_test: int = 10):
    """(labelled, pool, test) fixture splits of the 3-colour task."""
    return FakeImages(n_train, 0, "train"), FakeImages(0, 1, "pool"), FakeImages(n_test, 2, "test")


def write_synthetic(root: Path, real: ImageDataset, per_image: int = 2, with_metadata: bool = True,
                    folders=None) -> None:
    """A synthetic set in the documented layout: copies of real images + metadata.jsonl."""
    from mvc.data.synthetic import class_folder

    folders = folders or (lambda y: class_folder(y, CLASSES[y], len(CLASSES)))
    lines = []
    for i, y in enumerate(real.targets):
        folder = root / folders(int(y))
        folder.mkdir(parents=True, exist_ok=True)
        for v in range(per_image):
            f = folder / f"{safe_name(real.ids[i])}_v{v:03d}.png"
            real.load_image(i).save(f)
            lines.append({"file_name": str(f.relative_to(root)), "label": int(y), "class_name": CLASSES[y],
                          "source_id": real.ids[i], "variant": v, "seed": 0})
    if with_metadata:
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def tiny_cfg(out: Path, **over):
    """A fast classifier config on 16-px images (resnet10t, standard stem)."""
    base = {"run.output_dir": str(out), "data.name": "imagefolder", "classifier.backbone": "resnet10t",
            "classifier.cifar_stem": False, "classifier.input_size": 16, "classifier.epochs": 2,
            "classifier.batch_size": 8, "classifier.lr": 3e-3, "classifier.augment": "none"}
    base.update({f"classifier.{k}" if "." not in k else k: v for k, v in over.items()})
    return make_config(overrides=base)


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator
    return Accelerator(cpu=True)


#################################################################################
#                                  Strategies                                   #
#################################################################################

def _scfg(**kw):
    d = dict(epochs=10, batch_size=10, two_phase_fraction=0.2, two_phase_lr_scale=0.1, prob_p=0.8, prob_mode="append",
             lr=1.0, scheduler="constant", milestones=[0.5], gamma=0.1, strategy="real")
    d.update(kw)
    return SimpleNamespace(**d)


def test_registry_lists_strategies_and_refuses_unknown():
    assert list_strategies() == STRATEGIES.names() and {"real", "concat", "two_phase", "probabilistic"} <= set(list_strategies())
    with pytest.raises(MVCError, match="unknown strategy 'nope'"):
        STRATEGIES.get("nope")
    with pytest.raises(MVCError, match="classifier.strategy"):
        make_config(overrides={"classifier.strategy": "nope"})


def test_real_and_concat_cover_their_images_once():
    real = build_strategy(_scfg(strategy="real"), 23, 40).epoch_plan(0, seed=1)
    assert sorted(np.concatenate(real.batches).tolist()) == list(range(23))
    concat = build_strategy(_scfg(strategy="concat"), 23, 40).epoch_plan(0, seed=1)
    idx = np.concatenate(concat.batches)
    assert sorted(idx.tolist()) == list(range(63)) and concat.num_synthetic(23) == 40
    assert all(len(b) >= 2 for b in concat.batches)
    # deterministic from (seed, epoch), different across epochs
    again = build_strategy(_scfg(strategy="concat"), 23, 40)
    assert all((a == b).all() for a, b in zip(again.epoch_plan(0, 1).batches, concat.batches))
    assert not np.array_equal(np.concatenate(again.epoch_plan(1, 1).batches), idx)


@pytest.mark.parametrize("n, batch", [(11, 10), (21, 10), (31, 10), (2, 1)])
def test_a_trailing_batch_of_one_joins_the_previous_one(n, batch):
    """BatchNorm cannot train on one image; every image still comes exactly once, in order."""
    batches = chunk(np.arange(n), batch)
    assert all(len(b) >= 2 for b in batches) or n < 2
    assert np.concatenate(batches).tolist() == list(range(n))


def test_concat_needs_synthetic():
    with pytest.raises(MVCError, match="needs synthetic"):
        build_strategy(_scfg(strategy="concat"), 10, 0)


def test_two_phase_splits_the_budget_in_steps_and_restarts_the_lr():
    # budget: 10 real-only epochs of 2 batches = 20 steps; phase 2 = round(0.2 x 20) = 4 steps on real only
    cfg = _scfg(strategy="two_phase", epochs=10, two_phase_fraction=0.2, two_phase_lr_scale=0.1, scheduler="cosine")
    st = build_strategy(cfg, 20, 60)
    assert st.phase_steps() == {"phase1": 16, "phase2": 4} and st.epochs == 4  # 8 + 8 concat steps, 2 + 2 real
    step = {"phase1": 0, "phase2": 0}
    for epoch in range(st.epochs):
        plan = st.epoch_plan(epoch, seed=0)
        idx = np.concatenate(plan.batches)
        for s, _ in enumerate(plan.batches):
            total = 16 if plan.phase == "phase1" else 4
            scale = 1.0 if plan.phase == "phase1" else 0.1
            assert plan_lr(cfg, plan, s) == pytest.approx(scale * lr_multiplier("cosine", step[plan.phase] / total, 1.0))
            step[plan.phase] += 1
        if plan.phase == "phase1":  # real + synthetic, full LR, cosine over the 16 phase-1 steps
            assert len(idx) == 80 and (idx >= 20).sum() == 60
        else:  # real only, LR x 0.1, the schedule restarts
            assert sorted(idx.tolist()) == list(range(20))
    assert step == {"phase1": 16, "phase2": 4}
    assert plan_lr(cfg, st.epoch_plan(2, 0), 0) == pytest.approx(0.1)  # the first phase-2 step


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("steps", [None, 37])
def test_every_strategy_gets_the_same_optimizer_step_budget(steps, world):
    """Equal compute: real, concat, two_phase, probabilistic and synthetic_only all take the same number of
    optimizer steps (classifier.steps, else classifier.epochs real-only epochs), whatever their epoch size."""
    from mvc.classifier.data import shard_batches
    from mvc.classifier.strategies import chunk, num_batches

    budget = steps or 10 * (num_batches(23, 10) // world)  # 23 real images in batches of 10: 2 batches
    for name in ["real", "concat", "two_phase", "probabilistic", "synthetic_only"]:
        st = build_strategy(_scfg(strategy=name, steps=steps), 23, 40, world)
        taken = sum(len(shard_batches(st.epoch_plan(e, 0).batches, r, world)) for e in range(st.epochs)
                    for r in range(world)) // world
        assert st.total_steps == budget and taken == budget, name
    assert all(num_batches(n, b) == len(chunk(np.arange(n), b)) for n in range(1, 40) for b in (1, 2, 5, 10))
    images = {name: sum(build_strategy(_scfg(strategy=name), 23, 40).epoch_plan(e, 0).num_images
                        for e in range(build_strategy(_scfg(strategy=name), 23, 40).epochs))
              for name in ["real", "probabilistic"]}
    assert images["real"] == 10 * 23 and images["probabilistic"] > 1.5 * images["real"]  # p = 0.8 appended


@pytest.mark.parametrize("mode", ["append", "replace"])
@pytest.mark.parametrize("p", [0.25, 0.8])
def test_probabilistic_mixes_at_the_configured_rate(mode, p):
    st = build_strategy(_scfg(strategy="probabilistic", prob_p=p, prob_mode=mode, batch_size=16, epochs=30), 200, 37)
    n_syn = n_real_slots = 0
    for epoch in range(30):
        plan = st.epoch_plan(epoch, seed=3)
        for b in plan.batches:
            syn = int((b >= 200).sum())
            real = len(b) - syn
            if mode == "replace":
                assert len(b) in (16, 8)  # real batch sizes are kept (200 = 12 x 16 + 8)
            n_syn += syn
            n_real_slots += real + (syn if mode == "replace" else 0)
        assert sorted(set(np.concatenate(plan.batches)[np.concatenate(plan.batches) >= 200])) <= list(range(200, 237))
    rate = n_syn / n_real_slots  # synthetic images per real image (6000 Bernoulli draws)
    assert abs(rate - p) < 0.03
    if mode == "append":  # every real image still appears once per epoch
        b = np.concatenate(st.epoch_plan(0, 3).batches)
        assert sorted(b[b < 200].tolist()) == list(range(200))


def test_lr_schedules():
    assert lr_multiplier("constant", 0.7, 1.0) == 1.0
    assert lr_multiplier("cosine", 0.0, 1.0) == pytest.approx(1.0) and lr_multiplier("cosine", 0.5, 1.0) == pytest.approx(0.5)
    assert [lr_multiplier("multistep", x, 1.0, milestones=[0.5, 0.75], gamma=0.1) for x in (0.2, 0.5, 0.8)] == \
        pytest.approx([1, 0.1, 0.01])
    # warm-up ramps linearly to the schedule's start; a floor lifts the end of a decay
    assert [lr_multiplier("linear", s, 10, warmup=4) for s in (0, 3)] == pytest.approx([0.25, 1.0])
    assert lr_multiplier("cosine", 10, 10, warmup=2, floor=0.1) == pytest.approx(0.1)


#################################################################################
#                                   Metrics                                     #
#################################################################################

def test_metrics_match_a_hand_computed_confusion_matrix():
    y_true = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]
    y_pred = [0, 1, 0, 1, 2, 2, 2, 0, 2, 2]
    m = compute_metrics(y_true, y_pred, 4)
    cm = [[2, 1, 0, 0], [0, 1, 1, 0], [1, 0, 3, 0], [0, 0, 1, 0]]
    assert m["confusion_matrix"] == cm
    assert m["accuracy"] == pytest.approx(6 / 10)
    recall = [2 / 3, 1 / 2, 3 / 4, 0.0]
    precision = [2 / 3, 1 / 2, 3 / 5, 0.0]  # class 3 never predicted -> 0
    f1 = [2 * p * r / (p + r) if p + r else 0.0 for p, r in zip(precision, recall)]
    assert m["per_class_accuracy"] == pytest.approx(recall)
    assert m["recall_macro"] == pytest.approx(np.mean(recall))
    assert m["precision_macro"] == pytest.approx(np.mean(precision))
    assert m["f1_macro"] == pytest.approx(np.mean(f1))


def test_confusion_figure_stays_readable_at_100_classes():
    import matplotlib.pyplot as plt

    from mvc.classifier.metrics import confusion_figure

    small = confusion_figure(np.eye(4, dtype=int) * 5, ["a", "b", "c", "d"])
    assert len(small.axes[0].texts) == 16  # every count written
    cm = np.random.default_rng(0).integers(0, 9, (100, 100))
    big = confusion_figure(cm, [f"class {i}" for i in range(100)])
    w, h = big.get_size_inches() * 120  # the dpi RunLogger saves at
    assert max(w, h) < 1600 and not big.axes[0].texts  # colour, not 10,000 numbers
    assert 20 <= len(big.axes[0].get_xticklabels()) <= 40
    plt.close(small)
    plt.close(big)


#################################################################################
#                             Models and synthetic data                         #
#################################################################################

def test_backbones_cifar_stem_and_errors():
    from mvc.classifier.models import build_model

    m, meta = build_model("resnet18", 5, cifar_stem=True, input_size=32)
    assert m.conv1.stride == (1, 1) and m.conv1.kernel_size == (3, 3) and isinstance(m.maxpool, torch.nn.Identity)
    assert m.forward_features(torch.zeros(1, 3, 32, 32)).shape[-1] == 4  # 32 / 8, not 32 / 32
    assert meta.input_size == 32 and len(meta.mean) == 3 and meta.crop_pct == 1.0
    _, meta = build_model("resnet10t", 2)
    assert meta.input_size == 176 and meta.crop_pct < 1  # from timm's data config
    with pytest.raises(MVCError, match="unknown backbone 'resnet_nope'"):
        build_model("resnet_nope", 3)
    with pytest.raises(MVCError, match="cifar_stem"):
        build_model("vit_tiny_patch16_224", 3, cifar_stem=True)


@pytest.mark.parametrize("name", ["autoaugment", "fastautoaugment", "randaugment", "trivialaugment"])
def test_classic_policies_run_after_crop_and_flip(name):
    """As in torchvision's and timm's recipes, a policy is added to random crop + flip, not put in their place:
    the policy's input is exactly the cropped and flipped batch."""
    from mvc.classifier.augment import Augment, random_crop_flip
    from mvc.classifier.models import ModelMeta

    meta = ModelMeta("resnet10t", 3, False, 16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    aug = Augment(meta, name)
    seen = []
    policy = aug.policy
    aug.policy = lambda im: seen.append(im.clone()) or policy(im)
    torch.manual_seed(0)
    out = aug(x)
    torch.manual_seed(0)
    cropped = random_crop_flip(x, aug.pad)
    assert aug.crop_flip and torch.equal(torch.stack(seen), cropped) and not torch.equal(cropped, x)
    assert out.shape == (6, 3, 16, 16) and out.dtype == torch.float32


def test_wide_resnets_are_timm_models_and_config_validation_does_not_import_timm():
    from mvc.classifier.models import build_model, check_backbone

    check_backbone("wrn28_10")
    big, meta = build_model("wrn28_10", 100, input_size=32)
    assert 36.0e6 < sum(p.numel() for p in big.parameters()) < 37.0e6 and meta.input_size == 32  # WRN-28-10: 36.5 M
    small, _ = build_model("wrn28_2", 10, input_size=32)
    assert small(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    r = _run([sys.executable, "-c", "import sys; from mvc.core.config import make_config; make_config(); "
                                    "print(sorted(m for m in ('timm', 'torchvision', 'diffusers') if m in sys.modules))"])
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr[-2000:]


def test_synthetic_reader_labels_from_metadata_and_folder_fallback(tmp_path):
    from mvc.data.synthetic import load_synthetic_set

    real = FakeImages(2, 0, "train")
    write_synthetic(tmp_path / "a", real, per_image=1)
    syn = load_synthetic_set(tmp_path / "a", CLASSES)
    assert len(syn) == 6 and sorted(syn.targets.tolist()) == [0, 0, 1, 1, 2, 2]
    meta = [json.loads(line) for line in (tmp_path / "a" / "metadata.jsonl").read_text().splitlines()]
    assert [int(t) for t in syn.targets] == [r["label"] for r in meta]
    held = load_synthetic_set(tmp_path / "a", CLASSES, exclude_sources={real.ids[0]})
    assert len(held) == 5
    # another tool's image folder without records: folders named after the classes (plain or safe_name)
    write_synthetic(tmp_path / "b", real, per_image=1, with_metadata=False, folders=lambda y: safe_name(CLASSES[y]))
    nometa = load_synthetic_set(tmp_path / "b", CLASSES)
    assert len(nometa) == 6
    for i in range(len(nometa)):
        im, y = nometa[i]
        assert np.asarray(im).mean(axis=(0, 1)).argmax() == y  # colour = class
    bad = meta[0] | {"class_name": "blue", "label": 0}
    (tmp_path / "a" / "metadata.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(MVCError, match="does not match"):
        load_synthetic_set(tmp_path / "a", CLASSES)
    (tmp_path / "a" / "metadata.jsonl").write_text(json.dumps(meta[0] | {"file_name": "../b/x.png"}) + "\n")
    with pytest.raises(MVCError, match="not an image file inside the set"):
        load_synthetic_set(tmp_path / "a", CLASSES)


#################################################################################
#                          Training, resume, predict                            #
#################################################################################

@pytest.fixture(scope="module")
def trained(tmp_path_factory, accelerator):
    """A short run on the separable fixture (probabilistic strategy + synthetic copies)."""
    from mvc.classifier.train import run_all

    out = tmp_path_factory.mktemp("trained")
    splits = make_splits(n_train=10, n_test=12)
    write_synthetic(out / "synthetic", splits[0], per_image=2)
    cfg = tiny_cfg(out, strategy="probabilistic", epochs=4, augment="standard", seeds=[0, 1])
    records = run_all(cfg, accelerator, splits=splits)
    return out, cfg, records


def test_training_reaches_high_accuracy_and_writes_outputs(trained):
    out, cfg, records = trained
    assert len(records) == 2
    r = records[0]
    assert r["last"]["accuracy"] >= 0.9, r["history"]
    assert r["n_real"] == 30 and r["n_synthetic"] == 60
    assert 0.2 < r["history"][0]["synthetic_share"] < 0.6  # p = 0.8 appended: 0.8 / 1.8 ≈ 0.44
    run = Path(r["run_dir"])
    assert run.name == "probabilistic-standard-resnet10t-seed0"
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["best_selected_on"] == "test" and "optimistic" in saved["note"]
    assert saved["generator"] == "mvc"  # the default set's method (generate.method), named in results.csv too
    assert len(saved["last"]["confusion_matrix"]) == 3 and (run / "confusion_last.png").stat().st_size > 0
    assert list((run / "tb").iterdir())
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0].startswith("dataset,k_per_class,backbone,strategy,augment,seed") and len(rows) == 3
    summary = json.loads((out / "classifier" / "probabilistic-standard-resnet10t-summary.json").read_text())
    assert summary["last"]["accuracy"]["values"] == [rr["last"]["accuracy"] for rr in records]


def test_predict_scores_a_folder(trained, tmp_path):
    from mvc.classifier import load_classifier, predict_images
    from mvc.classifier.predict import list_images, predict

    out, cfg, records = trained
    test = FakeImages(3, 9, "x")
    for i, y in enumerate(test.targets):
        test.load_image(i).save(tmp_path / f"{i:02d}_{y}.png")
    probs = predict(Path(records[0]["run_dir"]), tmp_path)
    assert probs.shape == (9, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    truth = [int(p.stem.split("_")[1]) for p in list_images(tmp_path)]
    assert (probs.argmax(1) == truth).mean() >= 0.8
    bundle = load_classifier(Path(records[0]["run_dir"]) / "checkpoints")
    assert bundle.classes == CLASSES
    pil = [Image.open(p).convert("RGB") for p in list_images(tmp_path)]
    assert np.allclose(predict_images(bundle, pil), probs, atol=1e-5)
    with pytest.raises(MVCError):
        load_classifier(tmp_path / "missing.pt")


def test_resume_equals_not_stopping(tmp_path, accelerator):
    from mvc.classifier.outputs import describe_run
    from mvc.classifier.train import run_classifier
    from mvc.core.checkpoint import list_checkpoints, load_checkpoint

    splits = make_splits(n_train=6, n_test=6)
    finals = []
    for name, stops in [("straight", [None]), ("stopped", [1, None])]:
        write_synthetic(tmp_path / name / "synthetic", splits[0], per_image=1)
        cfg = tiny_cfg(tmp_path / name, strategy="probabilistic", epochs=3, augment="standard", checkpoint_every=1)
        for k, stop in enumerate(stops):
            rec = run_classifier(describe_run(cfg, 0), accelerator, splits, resume="latest" if k else None, stop_after=stop)
            assert (rec is None) == (stop is not None)
        ckpt_dir = Path(rec["run_dir"]) / "checkpoints"
        finals.append((rec, load_checkpoint(list_checkpoints(ckpt_dir)[-1])))
    (a, ca), (b, cb) = finals
    untimed = lambda h: [{k: v for k, v in e.items() if k != "epoch_time_s"} for e in h]  # noqa: E731
    assert untimed(a["history"]) == untimed(b["history"]) and len(a["history"]) == 3
    assert a["last"]["confusion_matrix"] == b["last"]["confusion_matrix"]
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k


def test_resume_latest_over_seeds_resumes_the_stopped_run_and_starts_the_others(tmp_path, accelerator):
    from mvc.classifier.train import run_all

    splits = make_splits(n_train=6, n_test=6)
    cfg = tiny_cfg(tmp_path, epochs=2, checkpoint_every=1, seeds=[0, 1])
    assert run_all(cfg, accelerator, splits, stop_after=1) == []  # stopped inside seed 0; seed 1 never started
    records = run_all(cfg, accelerator, splits, resume="latest")
    assert [r["seed"] for r in records] == [0, 1] and all(len(r["history"]) == 2 for r in records)


def test_probe_and_kfold(tmp_path, accelerator):
    from mvc.classifier.train import run_all

    cfg = tiny_cfg(tmp_path, probe="logreg", kfold=2, strategy="real")
    recs = run_all(cfg, accelerator, splits=make_splits(n_train=6, n_test=4))
    assert [r["fold"] for r in recs] == [0, 1] and all(r["n_test"] == 9 for r in recs)  # 18 labelled / 2 folds
    assert all(r["last"]["accuracy"] >= 0.8 for r in recs)
    assert (tmp_path / "classifier" / "real-probe_logreg-resnet10t-seed0" / "metrics.json").is_file()


#################################################################################
#                                 Scripts, DDP                                  #
#################################################################################

def _run(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, **kw)


def test_script_help_and_one_line_errors():
    # the two processes at once (each spends its seconds importing torch)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "train_classifier.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for args in (["--help"], ["--classifier.backbone=resnet_nope", "--run.output_dir=/nonexistent/x",
                                       "--classifier.strategy=real", "--data.name=fashion_mnist"])]
    (help_out, _), (_, err) = [p.communicate(timeout=120) for p in procs]
    assert procs[0].returncode == 0 and "--strategy" in help_out and "predict" in help_out
    assert procs[1].returncode == 2 and "Traceback" not in err
    assert err.strip().splitlines() == ["error: unknown backbone 'resnet_nope': not a timm model name "
                                         "(see timm.list_models(), e.g. resnet18)"]


DDP_SCRIPT = """
from tests.classifier.test_classifier import make_splits, tiny_cfg, write_synthetic
from pathlib import Path
from mvc.classifier.train import run_all
from mvc.core.distributed import make_accelerator
out = Path({out!r})
cfg = tiny_cfg(out, strategy="concat", epochs=2, batch_size=6)
acc = make_accelerator(cfg.classifier.mixed_precision)
splits = make_splits(n_train=6, n_test=6)
if acc.is_main_process:
    write_synthetic(out / "synthetic", splits[0], per_image=1)
acc.wait_for_everyone()
rec = run_all(cfg, acc, splits=splits)[0]
print("RANK", acc.process_index, "WORLD", acc.num_processes, "STEPS", rec["history"][0]["steps"], flush=True)
acc.end_training()
"""


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(out=str(tmp_path / "out")))
    import socket

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
              "--master_port", str(port), str(script)], timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = sorted(l for l in r.stdout.splitlines() if l.startswith("RANK"))
    # budget: 2 real-only epochs, each 18 images / batch 6 = 3 batches = 1 step of 2 batches -> 2 steps;
    # concat's first epoch (36 images = 6 batches = 3 steps per process) is cut there
    assert lines == ["RANK 0 WORLD 2 STEPS 2", "RANK 1 WORLD 2 STEPS 2"], r.stdout
    rec = json.loads(next((tmp_path / "out" / "classifier").glob("concat-*/metrics.json")).read_text())
    assert rec["world_size"] == 2 and rec["last"]["num_samples"] == 18
    assert rec["steps"] == rec["budget_steps"] == 2 and rec["epochs"] == 1 and rec["images_seen"] == 4 * 6
