"""Curation (mvc/curation.py): per-class thresholds from cross-fitted selectors of the labelled subset, the three
filters, equal budgets by rounds of candidates, what is dropped kept on record, resume, a class that cannot reach
its count, and the semantic filter's code path with a CLIP built from a config."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mvc.core.config import build_parser, make_config, parse_args
from mvc.core.utils import MVCError, read_jsonl
from mvc.generation import curation
from tests.helpers import micro_argv, write_fashion_idx

ROOT = Path(__file__).resolve().parents[2]

#################################################################################
#                                  Pure parts                                   #
#################################################################################


def test_thresholds_come_per_class_from_the_out_of_fold_scores():
    # 2 classes, 4 images each; class 1's images are all misclassified out of fold
    probs = np.array([[.9, .1], [.8, .2], [.6, .4], [.7, .3], [.6, .4], [.7, .3], [.8, .2], [.9, .1]])
    targets = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    feats = np.array([[1, 0], [1, .1], [1, .3], [1, -.2], [0, 1], [.1, 1], [.3, 1], [-.2, 1]], float)
    th = curation.fit_thresholds(probs, feats, targets, 2, wrong_q=0.5, easy_q=1.0, copy_q=0.0)
    assert th.wrong[0] == pytest.approx(0.75) and th.wrong[1] == 1.0  # no correct class-1 image: strictest
    assert th.easy_conf[0] == pytest.approx(0.9) and th.easy_conf[1] == pytest.approx(0.4)
    nn = curation.nearest_other_distance(feats, targets)
    assert th.copy_dist[0] == pytest.approx(nn[:4].min()) and np.isinf(curation.nearest_other_distance(feats[:1],
                                                                                                       targets[:1]))[0]


def test_each_filter_drops_only_what_it_names():
    th = curation.Thresholds(wrong=np.array([0.7, 0.7]), easy_conf=np.array([0.8, 0.8]),
                             copy_dist=np.array([0.05, 0.05]), semantic=np.array([0.3, 0.3]))
    probs = np.array([[0.1, 0.9],    # label 0, confidently class 1: wrong
                      [0.4, 0.6],    # label 0, class 1 but not confidently: kept
                      [0.95, 0.05],  # label 0, confident and a near copy: easy
                      [0.95, 0.05],  # label 0, confident but far from its source: kept
                      [0.6, 0.4]])   # label 0, semantic score too low
    labels, dist, sem = np.zeros(5, int), np.array([.5, .5, .01, .5, .5]), np.array([.9, .9, .9, .9, .1])
    assert curation.decide(probs, labels, dist, th, ["wrong", "easy", "semantic"], sem) == [
        "wrong", None, "easy", None, "semantic"]
    assert curation.decide(probs, labels, dist, th, ["easy"], sem) == [None, None, "easy", None, None]
    assert curation.decide(probs, labels, dist, th, [], sem) == [None] * 5


def test_candidates_grow_by_the_measured_keep_rate_up_to_the_cap():
    grown = curation.next_targets({0: 10, 1: 10, 2: 10}, {0: 10, 1: 10, 2: 30}, {0: 10, 1: 5, 2: 4}, max_factor=3)
    assert grown[0] == 10  # at its count: unchanged
    assert grown[1] == 20  # kept half: 5 more kept need 10 more candidates
    assert grown[2] == 30  # at the cap: stays
    assert curation.next_targets({0: 4}, {0: 4}, {0: 0}, max_factor=2)[0] == 8  # nothing kept: the cap at once
    assert curation.next_targets({0: 10}, {0: 10}, {0: 9}, max_factor=3)[0] == 12  # at least one more, by the rate


def test_the_first_kept_images_spread_over_sources_and_the_rest_are_surplus():
    recs = [{"file": f"{s}_{v}", "label": 0, "source_index": s, "variant": v} for s in range(3) for v in range(3)]
    keep, surplus = curation.first_kept(recs, {0: 4})
    assert keep == {"0_0", "1_0", "2_0", "0_1"} and len(surplus) == 5


#################################################################################
#                            On a micro set (img2img)                           #
#################################################################################

@pytest.fixture(scope="module")
def micro(tmp_path_factory, one_thread):
    """The fixture data and a config factory: img2img sets of 4 images per class with curation on, 2 folds."""
    base = tmp_path_factory.mktemp("curation")
    data = write_fashion_idx(base / "data")

    def cfg(out: str, *extra: str):
        argv = micro_argv(data, base / out, base / "cache", "--generate.method=img2img", "--generate.per_class=4",
                          "--curation.filters=[wrong, easy]", "--curation.folds=2", *extra)
        return parse_args(build_parser("test"), argv)[0]
    return cfg


def _forced(cfg, wrong: float = 0.0):
    """A real curator of `cfg` whose wrong-threshold is `wrong` for every class (0: every image the selector puts
    in another class is dropped; with micro selectors that is most of them)."""
    from mvc.core.distributed import make_accelerator
    from mvc.data import load_splits

    curation.train_selectors(cfg, make_accelerator())
    labelled = load_splits(cfg.data)[0]
    cur = curation.build_curator(cfg, labelled)
    cur.th.wrong[:] = wrong
    return cur


def test_a_curated_set_reaches_its_counts_or_says_why_and_keeps_every_drop_on_record(micro, caplog):
    from mvc.core.paths import RunPaths
    from mvc.generation.generate import generate_synthetic

    cfg = micro("a", "--curation.max_factor=3")
    with caplog.at_level(logging.WARNING):
        summary = generate_synthetic(cfg, curator=_forced(cfg), progress=False)
    root = RunPaths.of(cfg).synthetic
    assert root.name == "synthetic_img2img_curated_easy_wrong"
    kept, dropped = read_jsonl(root / "metadata.jsonl"), read_jsonl(root / "rejected.jsonl")
    made = {int(c): n for c, n in json.loads((root / curation.TARGETS_FILE).read_text()).items()}
    counts = Counter(r["label"] for r in kept)
    reached = [c for c in range(10) if counts.get(c, 0) == 4]
    assert reached and all(counts.get(c, 0) <= 4 for c in range(10))  # never more than planned
    for c in range(10):  # a class short of its count made every candidate it may, and the log names it
        if counts.get(c, 0) < 4:
            assert made[c] == 12 and f"keeps {counts.get(c, 0)} of its 4 planned images" in caplog.text
    assert any(made[c] > 4 for c in reached) or all(made[c] == 4 for c in reached)
    # files and records agree; every drop is on record with its reason (and never the reference's doing)
    assert all((root / r["file"]).is_file() for r in kept) and not any((root / r["file"]).exists() for r in dropped)
    assert "wrong" in {r["curation"] for r in dropped} and {r["curation"] for r in dropped} <= {"wrong", "easy",
                                                                                                 "surplus"}
    assert all(r["selector_pred"] != r["label"] for r in dropped if r["curation"] == "wrong")
    assert all(r["curation"] is None and "selector_p_label" in r for r in kept)
    assert len(kept) + len(dropped) == sum(made.values())  # every candidate is kept or on record as dropped
    # each class keeps its first survivors in variant-then-source order; later survivors are surplus
    survivors = kept + [r for r in dropped if r["curation"] == "surplus"]
    first, _ = curation.first_kept(survivors, {c: 4 for c in range(10)})
    assert {r["file"] for r in kept} == first
    assert sum(summary["curation"]["dropped"]["wrong"]) == sum(r["curation"] == "wrong" for r in dropped)
    # a rerun makes nothing: every candidate is on record, kept or dropped
    again = generate_synthetic(cfg, curator=_forced(cfg), progress=False)
    assert again["made"] == 0 and again["rejected_now"] == 0
    assert read_jsonl(root / "metadata.jsonl") == kept


def test_without_drops_the_curated_set_is_the_plain_plan(micro):
    from mvc.core.paths import RunPaths
    from mvc.generation.generate import generate_synthetic

    cfg = micro("b")
    generate_synthetic(cfg, curator=_forced(cfg, wrong=2.0), progress=False)  # no probability exceeds 2
    root = RunPaths.of(cfg).synthetic
    assert Counter(r["label"] for r in read_jsonl(root / "metadata.jsonl")) == {c: 4 for c in range(10)}
    assert not read_jsonl(root / "rejected.jsonl")
    assert set(json.loads((root / curation.TARGETS_FILE).read_text()).values()) == {4}


def test_the_selectors_are_cross_fitted_on_the_labelled_subset(micro):
    from mvc.core.distributed import make_accelerator
    from mvc.data import load_splits

    cfg = micro("c")
    curation.train_selectors(cfg, make_accelerator())
    labelled = load_splits(cfg.data)[0]
    sel = curation.load_selectors(cfg, labelled)
    assert len(sel.bundles) == 2 and set(sel.fold_of) == {str(i) for i in labelled.ids}
    assert sorted(Counter(sel.fold_of.values()).values()) == [10, 10]
    assert np.allclose(sel.probs.sum(1), 1, atol=1e-4) and sel.feats.shape[0] == len(labelled)
    for k, b in enumerate(sel.bundles):  # each selector trained without the images it scores
        m = json.loads((Path(b.checkpoint).parents[1] / "metrics.json").read_text())
        assert m["fold"] == k and m["n_real"] == 10 and m["strategy"] == "real"


def test_semantic_filter_needs_a_clip_and_scores_with_one_built_from_a_config():
    with pytest.raises(MVCError, match="'semantic' needs a CLIP model and none is available here"):
        make_config({}, {"curation.filters": ["semantic"]})
    import torch
    from PIL import Image
    from transformers import CLIPConfig, CLIPModel

    from mvc.diffusion.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer(max_length=16)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "bos_token_id": tok.bos_token_id,
                     "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 16, "patch_size": 8}, projection_dim=8))
    scorer = curation.SemanticScorer(model, tok)
    images = [Image.new("RGB", (20, 20), (i * 40, 0, 0)) for i in range(3)]
    s = scorer(images, ["a photo of class type a", "a photo of class type b"], [0, 1, 0])
    assert s.shape == (3,) and np.all((s > 0) & (s < 1))
    assert not np.allclose(s[0], s[2])  # it looks at the image


def test_curated_sets_and_their_runs_are_named_by_their_filters(tmp_path):
    from mvc.classifier.outputs import describe_run
    from mvc.core.paths import RunPaths

    base = {"run": {"output_dir": str(tmp_path)}}
    plain = make_config(base, {"classifier.strategy": "probabilistic"})
    both = make_config(base, {"classifier.strategy": "probabilistic", "curation.filters": ["easy", "wrong"]})
    wrong = make_config(base, {"classifier.strategy": "probabilistic", "curation.filters": ["wrong"]})
    assert RunPaths.of(plain).synthetic.name == "synthetic"
    assert RunPaths.of(both).synthetic.name == "synthetic_curated_easy_wrong"  # sorted
    assert RunPaths.of(wrong).synthetic.name == "synthetic_curated_wrong"
    assert describe_run(both, 0).run_dir.name == "probabilistic-standard-resnet18-curated_easy_wrong-seed0"
    assert describe_run(make_config(base, {"curation.filters": ["wrong"]}), 0).run_dir.name == "real-standard-resnet18-seed0"


@pytest.mark.slow
def test_the_study_compares_curated_and_plain_sets_at_equal_budgets(tmp_path, one_thread):
    import curation_study

    data = write_fashion_idx(tmp_path / "data")
    argv = micro_argv(data, tmp_path / "run", tmp_path / "cache", "--pipeline.seeds=[0]",
                      "--curation.folds=2", "--generate.per_class=3")
    report = curation_study.cli([*argv, "--generators", "img2img", "--filters", "wrong", "easy", "--ablation",
                                 "wrong", "--runs", "probabilistic", "--baselines", "real"])
    text = report.read_text()
    out = tmp_path / "run-curation"
    assert report == out / "curation.md" and (out / "figures" / "curation.png").is_file()
    rows = json.loads((out / "curation.json").read_text())["rows"]
    assert [(r["generator"], r["sampling"]) for r in rows] == [("img2img", "none"), ("img2img", "wrong + easy"),
                                                               ("img2img", "wrong")]
    assert all(r["images"] == 30 for r in rows)  # the planned count, curated or not
    assert (out / "classifier" / "probabilistic-standard-resnet10t-img2img-curated_easy_wrong-seed0" / "metrics.json").is_file()
    assert (out / "classifier" / "probabilistic-standard-resnet10t-img2img-seed0" / "metrics.json").is_file()
    assert "**Does curation help?**" in text and "| img2img | wrong + easy |" in text
