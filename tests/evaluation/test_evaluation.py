"""Synthetic-set evaluation: each metric on fixtures whose answer is known, and the whole stage on micro data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mvc.evaluation.metrics import (
    cosine_distances,
    diversity_ratio,
    equivalent_real,
    frechet_distance,
    label_fidelity,
    novelty,
    within_class_diversity,
)
from tests.helpers import write_fashion_idx

#################################################################################
#                               Metrics (pure)                                  #
#################################################################################


def clusters(n_per_class=30, classes=4, dim=16, spread=0.3, seed=0):
    """Gaussian clusters around random class centres: (features, labels)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 3
    labels = np.repeat(np.arange(classes), n_per_class)
    return centres[labels] + spread * rng.normal(size=(len(labels), dim)), labels


def test_fidelity_counts_agreement_per_class():
    f = label_fidelity(np.array([0, 1, 1, 2, 0, 2]), np.array([0, 1, 2, 2, 0, 1]), 4)
    assert f["overall"] == pytest.approx(4 / 6)
    assert f["per_class"] == [1.0, 0.5, 0.5, None] and f["count"] == [2, 2, 2, 0]
    # shuffled labels against a perfect judge: about chance
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 10, 20000)
    assert label_fidelity(truth, rng.permutation(truth), 10)["overall"] == pytest.approx(0.1, abs=0.01)


def test_diversity_of_a_copy_is_one_of_a_repeated_image_zero():
    x, y = clusters()
    real = within_class_diversity(x, y, 4)
    assert all(v > 0 for v in real)
    assert diversity_ratio(within_class_diversity(x.copy(), y, 4), real)["ratio"] == pytest.approx(1.0)
    same = np.repeat(x[:1], len(x), axis=0)
    assert within_class_diversity(same, y, 4) == pytest.approx([0.0] * 4, abs=1e-9)
    tighter = within_class_diversity(x * 0 + clusters(spread=0.1)[0], y, 4)
    assert diversity_ratio(tighter, real)["ratio"] < 1
    # a class with fewer than two images has no diversity, and is left out of the ratio
    assert within_class_diversity(x[:31], y[:31], 4)[1:] == [None, None, None]


def test_frechet_distance_is_zero_for_one_distribution_and_grows_with_a_shift():
    a, _ = clusters(n_per_class=200, seed=1)
    b, _ = clusters(n_per_class=200, seed=1)
    assert frechet_distance(a, b) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, b + 0.5) > frechet_distance(a, b + 0.1) > 0.05
    # the closed form for two 1-D Gaussians: (m1 - m2)^2 + (s1 - s2)^2
    rng = np.random.default_rng(0)
    u, v = rng.normal(0, 1, (200000, 1)), rng.normal(2, 3, (200000, 1))
    assert frechet_distance(u, v) == pytest.approx(4 + 4, rel=0.02)


def test_frechet_distance_of_fewer_images_than_dimensions_is_the_full_formula():
    """min(N, M) < D takes the nuclear norm of the centred factors' product: the D x D formula's value."""
    def full(a, b):  # FID's formula through sqrt(S1) S2 sqrt(S1), D x D
        s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        w, v = np.linalg.eigh(s1)
        root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        cross = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()
        return ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross

    rng = np.random.default_rng(0)
    for n, m, d in ((6, 9, 40), (12, 100, 64), (3, 2, 5)):  # both sets small; one small, one large; tiny
        scale = rng.uniform(0, 2, d)
        a = np.maximum(rng.normal(0, 1, (n, d)), 0) * scale  # non-negative, like ReLU features
        b = np.maximum(rng.normal(0.3, 1, (m, d)), 0) * scale
        assert frechet_distance(a, b) == pytest.approx(full(a, b), rel=1e-7)
        assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_novelty_separates_copies_from_new_images():
    lab, _ = clusters(n_per_class=5, seed=3)
    src = np.arange(len(lab))
    copies = novelty(lab.copy(), src, lab)
    assert copies["to_source"] == pytest.approx(0.0, abs=1e-9) and copies["nearest_is_source"] == 1.0
    # "nearest other" never counts the source itself: for a copy it is the labelled images' own NN distance
    assert copies["to_nearest_other"] == pytest.approx(copies["real_nearest_other"])
    rng = np.random.default_rng(1)
    moved = novelty(lab + rng.normal(0, 2, lab.shape), src, lab)
    assert moved["to_source"] > 0.05 and moved["nearest_is_source"] < 1
    assert cosine_distances(lab, lab).diagonal() == pytest.approx(np.zeros(len(lab)), abs=1e-9)


def test_equivalent_real_interpolates_in_log_size_and_bounds_outside():
    sizes, accs = [10, 20, 40, 80], [0.6, 0.7, 0.75, 0.8]
    assert equivalent_real(sizes, accs, 0.7) == {"images_per_class": pytest.approx(20.0), "bound": "="}
    mid = equivalent_real(sizes, accs, 0.65)["images_per_class"]
    assert mid == pytest.approx(np.sqrt(10 * 20))  # halfway in log(size)
    assert equivalent_real(sizes, accs, 0.5) == {"images_per_class": 10.0, "bound": "<="}
    assert equivalent_real(sizes, accs, 0.9) == {"images_per_class": 80.0, "bound": ">="}
    # a noisy, non-monotone curve is read through its running maximum
    assert equivalent_real(sizes, [0.6, 0.72, 0.70, 0.8], 0.71)["images_per_class"] < 20


#################################################################################
#                       The stage, on micro Fashion-MNIST                       #
#################################################################################

@pytest.fixture(scope="module")
def micro(tmp_path_factory, one_thread):
    """Micro data (12 train / 4 test images per class), a config whose reference trains in seconds, the splits."""
    from mvc.core.config import make_config
    from mvc.data import load_splits

    base = tmp_path_factory.mktemp("eval")
    data = write_fashion_idx(base / "data", train_per_class=12, test_per_class=4)
    cfg = make_config(overrides={
        "run.output_dir": str(base / "run"), "data.root": str(data), "data.k_per_class": 3,
        "evaluate.cache_dir": str(base / "refcache"), "evaluate.reference_epochs": 8,
        "evaluate.reference_batch_size": 16, "evaluate.reference_input_size": 16, "evaluate.real_limit": None,
        "classifier.backbone": "mvc_refcnn", "classifier.input_size": 16, "classifier.cifar_stem": False,
        "classifier.epochs": 2, "classifier.batch_size": 10, "pipeline.seeds": [0]})
    return cfg, load_splits(cfg.data)


def write_copies(root, images, labels, classes, source_ids=None):
    """A synthetic set (the format's own writer) whose images are the given PIL images."""
    from mvc.data.synthetic import Job, SyntheticSet, class_folder, make_record

    s = SyntheticSet(root)
    s.prepare({"method": "copies", "seed": 0}, classes)
    jobs = []
    for i, (im, y) in enumerate(zip(images, labels)):
        j = Job(i, int(y), classes[int(y)], class_folder(int(y), classes[int(y)], len(classes)), i,
                source_ids[i] if source_ids else f"copy/{i}", 0, "none")
        s.save_image(im, j)
        s.append(0, make_record(j, method="copies"))
        jobs.append(j)
    s.reconcile(jobs)


def test_known_answers_end_to_end(micro, tmp_path):
    from accelerate import Accelerator

    from mvc.evaluation.evaluate import evaluate_set, load_reference

    cfg, splits = micro
    labelled, _, test = splits
    acc = Accelerator(cpu=True)
    ref = load_reference(cfg, acc, progress=False)
    info = json.loads((ref.folder / "reference.json").read_text())
    assert info["train_images"] == 120 and "never trains" in info["note"]
    images = [test.load_image(i) for i in range(len(test))]
    # copies of the real test images: fidelity is the reference's test accuracy, diversity ratio 1
    write_copies(tmp_path / "copy", images, test.targets, test.classes)
    r = evaluate_set(cfg, tmp_path / "copy", acc, splits=splits, ref=ref, cas=False, progress=False)
    assert r["fidelity"]["overall"] == pytest.approx(info["test_accuracy"]) == pytest.approx(
        r["reference_accuracy_on_real"])
    assert r["diversity"]["ratio"] == pytest.approx(1.0, abs=1e-6)
    assert r["frechet"]["synthetic_vs_test"] == pytest.approx(0.0, abs=1e-3)
    # one repeated image per class: diversity 0
    firsts = {int(y): i for i, y in reversed(list(enumerate(test.targets)))}
    write_copies(tmp_path / "same", [images[firsts[int(y)]] for y in test.targets], test.targets, test.classes)
    r = evaluate_set(cfg, tmp_path / "same", acc, splits=splits, ref=ref, cas=False, progress=False)
    assert r["diversity"]["ratio"] == pytest.approx(0.0, abs=1e-6)
    # copies of the labelled images with their source ids: novelty 0 to the source
    lab_images = [labelled.load_image(i) for i in range(len(labelled))]
    write_copies(tmp_path / "lab", lab_images, labelled.targets, labelled.classes, list(labelled.ids))
    r = evaluate_set(cfg, tmp_path / "lab", acc, splits=splits, ref=ref, cas=False, progress=False, name="lab")
    assert r["novelty"]["to_source"] == pytest.approx(0.0, abs=1e-6) and r["novelty"]["nearest_is_source"] == 1.0
    report = Path(cfg.run.output_dir) / "evaluation" / "lab"
    assert (report / "metrics.json").is_file() and (report / "figure.png").stat().st_size > 0
    text = (report / "report.md").read_text()
    assert "never trains, filters or selects anything" in text and "| Trouser |" in text
    assert list((report / "tb").iterdir())


def test_shuffled_labels_score_near_chance_and_cas_trains_on_the_set(micro, tmp_path):
    from accelerate import Accelerator

    from mvc.evaluation.evaluate import evaluate_set, load_reference

    cfg, splits = micro
    labelled, _, test = splits
    acc = Accelerator(cpu=True)
    ref = load_reference(cfg, acc, progress=False)  # a cache hit: the module's first test trained it
    # 8 copies per test image, labels shuffled
    rng = np.random.default_rng(0)
    images = [test.load_image(i) for i in range(len(test))] * 8
    labels = rng.permutation(np.tile(test.targets, 8))
    write_copies(tmp_path / "shuffled", images, labels, test.classes)
    r = evaluate_set(cfg, tmp_path / "shuffled", acc, splits=splits, ref=ref, cas=True, progress=False)
    assert r["fidelity"]["overall"] < 0.25  # chance is 0.1
    cas = r["cas"]
    assert cas["values"] and 0 <= cas["mean"] <= 1 and cas["seeds"] == [0]
    cas_dir = Path(cfg.run.output_dir) / "evaluation" / "shuffled" / "cas" / "classifier"
    rec = json.loads(next(cas_dir.glob("synthetic_only-*/metrics.json")).read_text())
    assert rec["n_synthetic"] == len(images) and rec["strategy"] == "synthetic_only"


def test_table_shows_a_missing_source_distance_as_a_dash():
    from mvc.evaluation.evaluate import table_markdown

    row = {"images": 8, "fidelity": 0.5, "diversity_ratio": 1.0, "fd": 2.0, "fd_real": 0.5,
           "to_source": float("nan"), "to_nearest_other": 0.05, "cas_mean": None, "cas_std": None}
    line = table_markdown([("txt2img", row)]).splitlines()[-1]
    assert "| - / 0.050 | - |" in line and "nan" not in line


def test_vae_probe_judges_each_variant_and_refuses_bad_ones(micro, tmp_path):
    """scripts/probe_vae.py: one row per variant with its latent size, judged by the reference; a bad
    variant or width is one line before any work."""

    import probe_vae

    from mvc.core.utils import MVCError
    from tests.helpers import MICRO

    cfg, _ = micro
    argv = ["--config", str(MICRO), f"--data.root={cfg.data.root}", f"--run.output_dir={tmp_path / 'run'}",
            f"--evaluate.cache_dir={cfg.evaluate.cache_dir}", "--evaluate.reference_epochs=8",
            "--evaluate.reference_batch_size=16", "--evaluate.reference_input_size=16", "--evaluate.real_limit=null",
            "--data.k_per_class=3"]
    rows = probe_vae.cli(argv + ["--variant", "8,16:2", "--variant", "8:2"])
    assert [(r["vae_channels"], r["latent"], r["steps"]) for r in rows] == [([8, 16], 8, 2), ([8], 16, 2)]
    assert all(0.0 <= r["fidelity"] <= 1.0 and len(r["per_class"]) == 10 for r in rows)
    table = (tmp_path / "run" / "probe_vae" / "probe_vae.md").read_text()
    assert "| 8-16 | 8x8x4 | 2 |" in table and "| 8 | 16x16x4 | 2 |" in table
    with pytest.raises(MVCError, match="widths:steps"):
        probe_vae.cli(argv + ["--variant", "8,16"])
    with pytest.raises(MVCError, match="tiny.vae_channels"):
        probe_vae.cli(argv + ["--variant", "8,12:2"])  # not multiples of the GroupNorm groups
