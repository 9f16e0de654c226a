"""Clustering-based sampling: k-means per class on synthetic features (deterministic; incoherent and singleton
clusters dropped; the closest members kept; no class vanishes), the concepts it hands to the plan, the pairs
and per-concept fine-tuning, its cache, and "none" leaving every stage as it was (pinned by hashes of the
code before clustering existed). The stage tests use the micro profile's tiny shape."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest

import mvc.diffusion.clustering as clustering
from mvc.core.config import load_yaml, make_config
from mvc.core.paths import RunPaths
from mvc.core.utils import MVCError, fingerprint, read_jsonl
from mvc.data import ArraySource, ImageDataset
from mvc.data.pairs import build_pairs, grouping_fingerprint, load_pairs, save_pairs
from mvc.data.synthetic import class_target, plan_jobs
from mvc.diffusion.clustering import (
    ConceptGroups,
    KeptCluster,
    cluster_classes,
    concept_groups,
    n_selected,
    training_concepts,
)
from tests.helpers import MICRO, write_random_ip2p


def blobs(centres: list[np.ndarray], sizes: list[int], noise: list[float], seed: int = 0) -> np.ndarray:
    """Points around unit directions `centres`, `sizes[i]` of them with Gaussian `noise[i]`: (sum(sizes), D)."""
    rng = np.random.default_rng(seed)
    return np.concatenate([c + s * rng.standard_normal((n, len(c))) for c, n, s in zip(centres, sizes, noise)])


E = np.eye(16)
# class 0: two tight blobs; class 1: one tight blob and one diffuse one
FEATURES = np.concatenate([blobs([E[0], E[1]], [6, 6], [0.05, 0.05]), blobs([E[2], E[3]], [6, 6], [0.05, 1.0])])
TARGETS = np.repeat([0, 1], 12)


def run(features=FEATURES, targets=TARGETS, k=2, keep_fraction=1.0, min_coherence=0.8, max_spread=1.0, seed=0):
    return cluster_classes(features, targets, int(np.max(targets)) + 1, k, keep_fraction, min_coherence,
                           max_spread, seed)


#################################################################################
#                             Clustering (pure)                                 #
#################################################################################

def test_kmeans_per_class_is_deterministic_and_stays_within_classes():
    clusters, images = run()
    assert (clusters, images) == run()
    assert [im["index"] for im in images] == list(range(len(TARGETS)))
    assert all(im["label"] == TARGETS[im["index"]] for im in images)
    # the two tight blobs of class 0 are its two clusters
    c0 = [im["cluster"] for im in images[:12]]
    assert len(set(c0[:6])) == 1 and len(set(c0[6:])) == 1 and c0[0] != c0[6]
    assert all(0 <= im["distance"] <= 2 for im in images)


def test_incoherent_clusters_are_dropped_and_the_spread_limit_counts():
    clusters, images = run()
    kept = {(c["label"], c["cluster"]): c["kept"] for c in clusters}
    assert sum(kept.values()) == 3  # both of class 0, only the tight one of class 1
    diffuse = min((c for c in clusters if c["label"] == 1), key=lambda c: c["coherence"])
    assert not diffuse["kept"] and diffuse["coherence"] < 0.8 and not diffuse["fallback"]
    assert not any(im["kept"] for im in images if (im["label"], im["cluster"]) == (1, diffuse["cluster"]))
    tight = [c for c in clusters if c["kept"]]
    assert all(c["coherence"] > 0.95 and c["spread"] < 0.05 for c in tight)
    clusters, _ = run(min_coherence=-1.0, max_spread=min(c["spread"] for c in tight) / 2)
    assert [c["kept"] for c in clusters].count(True) == 2  # each class rescued once, nothing else passes


def test_keep_fraction_keeps_the_members_closest_to_the_centroid():
    assert [n_selected(n, 0.8) for n in (1, 2, 3, 5, 10)] == [1, 2, 3, 4, 8]
    assert n_selected(10, 0.1) == 2  # pairs need two
    clusters, images = run(keep_fraction=0.5, min_coherence=-1.0)
    for c in clusters:
        members = [im for im in images if (im["label"], im["cluster"]) == (c["label"], c["cluster"])]
        ranked = sorted(members, key=lambda im: im["distance"])
        assert [im["kept"] for im in ranked] == [True] * c["selected"] + [False] * (len(members) - c["selected"])
        assert c["selected"] == n_selected(len(members), 0.5)
        assert c["coherence"] >= c["coherence_all"]  # judged on the selected members (the thesis)


def test_a_class_never_vanishes_and_a_singleton_is_no_concept(caplog):
    with caplog.at_level(logging.WARNING, logger="mvc.diffusion.clustering"):
        clusters, images = run(min_coherence=1.0)  # nothing is perfectly coherent
    for label in (0, 1):
        kept = [c for c in clusters if c["label"] == label and c["kept"]]
        assert len(kept) == 1 and kept[0]["fallback"] and kept[0]["size"] >= 2
        assert any(im["kept"] for im in images if im["label"] == label)
    assert "keeping the most coherent one" in caplog.text
    # an outlier alone in its cluster is dropped however "coherent"; a class of one image keeps it
    feats = np.concatenate([blobs([E[0]], [5], [0.05]), E[5:6] * 3, E[7:8]])
    clusters, images = run(feats, np.array([0] * 6 + [1]), min_coherence=0.5)
    single = [c for c in clusters if c["label"] == 0 and c["size"] == 1]
    assert single and not single[0]["kept"] and images[5]["kept"] is False
    assert images[6]["kept"] and [c["fallback"] for c in clusters if c["label"] == 1] == [True]


def test_more_clusters_than_images_is_clamped_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="mvc.diffusion.clustering"):
        clusters, _ = run(FEATURES[:3], np.array([0, 0, 0]), k=5, min_coherence=-1.0)
    assert len(clusters) == 3 and "one cluster per image" in caplog.text


#################################################################################
#                          Concepts and their users                             #
#################################################################################

def toy(targets, name="toy") -> ImageDataset:
    t = np.asarray(targets)
    images = np.random.default_rng(0).integers(0, 255, (len(t), 16, 16), dtype=np.uint8)
    return ImageDataset(name, "train", [f"class{c}" for c in range(int(t.max()) + 1)], t,
                        [f"train/{i}" for i in range(len(t))], ArraySource(images))


def test_concept_groups_and_the_fine_tuning_list():
    _, images = run(keep_fraction=0.5)
    g = ConceptGroups.from_record({"images": images, "key": "k"})
    assert [(c.label, len(c.indices)) for c in g.concepts] == [(0, 3), (0, 3), (1, 3)]
    assert g.kept_indices() == sorted(im["index"] for im in images if im["kept"])
    for c in g.concepts:
        d = [images[i]["distance"] for i in c.indices]
        assert d == sorted(d) and all(g.concept_of(i) == c for i in c.indices)
    dropped = next(im["index"] for im in images if not im["kept"])
    assert g.concept_of(dropped) is None and g.group_ids()[dropped] == -1
    assert [g.group_ids()[i] for i in g.concepts[0].indices] == [g.concepts[0].cluster] * 3
    listed = training_concepts(g, TARGETS)
    assert listed == [(c.label, f"c{c.cluster}", list(c.indices)) for c in g.concepts]
    assert training_concepts(None, [1, 0, 1]) == [(0, "", [1]), (1, "", [0, 2])]


# The plan and pairs of the code before clustering existed (main at 56478c7), pinned by their hashes.
PLAN_TARGETS = np.array([1, 0, 2, 0, 1, 2, 2, 0, 0, 2, 1, 0])
PLAN_BEFORE = "72d8b6f1bd49f5b4"
PAIRS_BEFORE = "a1dd4aa9299f1a17"


def test_none_leaves_the_plan_and_the_pairs_as_they_were(tmp_path):
    ds = ImageDataset("toy", "train", ["a", "b", "c"], PLAN_TARGETS, [f"train/{i}" for i in range(12)],
                      ArraySource(np.zeros((12, 2, 2), np.uint8)))
    jobs = plan_jobs(ds, ["coarse", "fine"], multiplier=2.5)
    assert fingerprint([dataclasses.astuple(j) for j in jobs]) == PLAN_BEFORE
    assert plan_jobs(ds, ["coarse", "fine"], multiplier=2.5, sources=range(len(ds))) == jobs
    p = build_pairs(np.repeat(np.arange(3), [5, 2, 7]), 3, 0)
    assert fingerprint(p.cond, p.target) == PAIRS_BEFORE and p.grouping == ""
    save_pairs(tmp_path / "p.npz", p)
    with np.load(tmp_path / "p.npz") as z:
        assert "grouping" not in z  # the file as it was
    assert load_pairs(tmp_path / "p.npz", grouping="").grouping == ""


def test_the_plan_uses_only_kept_sources_and_keeps_class_totals():
    ds = toy(PLAN_TARGETS)
    kept = [1, 3, 0, 2, 9]  # class 0: 1, 3; class 1: 0; class 2: 2, 9
    jobs = plan_jobs(ds, ["coarse", "fine"], multiplier=2.5, sources=kept)
    assert {j.source for j in jobs} == set(kept)
    for c in range(3):
        n_real = int((PLAN_TARGETS == c).sum())
        assert sum(j.label == c for j in jobs) == class_target(n_real, 2.5, None)
    assert sorted(j.variant for j in jobs if j.source == 0) == list(range(class_target(3, 2.5, None)))
    with pytest.raises(MVCError, match="none among the sources"):
        plan_jobs(ds, ["none"], per_class=2, sources=[1, 3])


def same(a, b) -> bool:
    """Two Pairs draw the same pairs."""
    return np.array_equal(a.cond, b.cond) and np.array_equal(a.target, b.target) and a.grouping == b.grouping


def test_pairs_stay_within_groups_and_record_them(tmp_path, caplog):
    t = np.repeat([0, 1], [7, 5])
    groups = np.array([0, 0, 0, 1, 1, -1, 2, 0, 0, 1, -1, -1])  # class 1: group 1 is a single image
    with caplog.at_level(logging.WARNING, logger="mvc.data.pairs"):
        p = build_pairs(t, 4, 0, groups=groups)
    assert "group(s) with a single image" in caplog.text
    assert (groups[p.cond] == groups[p.target]).all() and (t[p.cond] == t[p.target]).all()
    assert (p.cond != p.target).all() and (groups[p.cond] >= 0).all()
    # every image of a group of 2 or more is a condition `rounds` times; singletons and left-out images never
    assert np.bincount(p.cond, minlength=12).tolist() == [4, 4, 4, 4, 4, 0, 0, 4, 4, 0, 0, 0]
    assert same(p, build_pairs(t, 4, 0, groups=groups))
    save_pairs(tmp_path / "p.npz", p)
    assert load_pairs(tmp_path / "p.npz", grouping=grouping_fingerprint(groups)).grouping == p.grouping != ""
    with pytest.raises(MVCError, match="not with the current sampling"):
        load_pairs(tmp_path / "p.npz", grouping="")
    with pytest.raises(MVCError, match="nothing to pair"):
        build_pairs(t, 1, 0, groups=np.where(np.arange(12) % 3 == 0, np.arange(12), -1))


def test_pairs_file_is_redrawn_when_the_clusters_change(tmp_path, caplog):
    from mvc.diffusion.finetune_loop import _pairs_for

    ds = toy(np.repeat([0, 1], 4))
    cfg = make_config(overrides={"pairs.rounds": 2})
    g = ConceptGroups([KeptCluster(0, 0, (0, 1)), KeptCluster(0, 1, (2, 3)), KeptCluster(1, 0, (4, 5, 6))], len(ds))
    path = tmp_path / "pairs.npz"
    whole = _pairs_for(cfg, ds, path, True)
    with caplog.at_level(logging.WARNING, logger="mvc.diffusion.finetune_loop"):
        grouped = _pairs_for(cfg, ds, path, True, g)
    assert "drawing new pairs" in caplog.text
    assert (g.group_ids()[grouped.cond] == g.group_ids()[grouped.target]).all() and 7 not in grouped.cond
    assert same(_pairs_for(cfg, ds, path, True, g), grouped)  # reused now
    assert same(_pairs_for(cfg, ds, path, True), whole) and whole.grouping == ""


#################################################################################
#                     The stage entry: embedding, cache, generation             #
#################################################################################

@pytest.fixture(scope="module")
def base(tmp_path_factory, one_thread):
    """A random pipeline folder of the micro profile's tiny shape: the base whose VAE embeds (base_vae)."""
    tiny = make_config(load_yaml(MICRO)).tiny
    return write_random_ip2p(tmp_path_factory.mktemp("clusters") / "base", tiny, ["class"])


def stage_cfg(tmp_path: Path, base: Path, **over):
    tree = load_yaml(MICRO)
    return make_config(tree, {"run.output_dir": str(tmp_path / "run"), "model.base": str(base),
                              "sampling.method": "clusters", "sampling.clusters_per_class": 2,
                              "sampling.min_coherence": -1.0, "sampling.max_spread": 1.0, **over})


def test_the_clusters_file_is_reused_and_a_settings_change_redraws_it(tmp_path, base, monkeypatch):
    ds = toy(np.repeat([0, 1, 2], 5))
    assert concept_groups(stage_cfg(tmp_path, base, **{"sampling.method": "none"}), ds, str(base)) is None
    cfg = stage_cfg(tmp_path, base)
    g = concept_groups(cfg, ds, str(base))
    folder = RunPaths.of(cfg).clusters
    rec = json.loads((folder / f"{g.key}.json").read_text())
    assert (folder / f"{g.key}.png").is_file() and rec["feature_dim"] == 4 * 8 * 8  # micro: 16 px, VAE /2
    assert {im["id"] for im in rec["images"]} == set(ds.ids) and set(rec["images"][0]) >= {
        "label", "cluster", "distance", "kept"}
    assert {c.label for c in g.concepts} == {0, 1, 2}

    def no_embedding(*a, **k):
        raise AssertionError("embedded again")

    monkeypatch.setattr(clustering, "embed", no_embedding)
    assert concept_groups(cfg, ds, str(base)) == g  # reused
    with pytest.raises(AssertionError, match="embedded again"):
        concept_groups(stage_cfg(tmp_path, base, **{"sampling.keep_fraction": 0.5}), ds, str(base))
    with pytest.raises(AssertionError, match="embedded again"):  # another labelled subset
        concept_groups(cfg, toy(np.repeat([0, 1, 2], 5), name="other"), str(base))


def test_a_timm_embedder_uses_its_own_preprocessing_and_missing_weights_are_one_line(tmp_path, base):
    ds = toy(np.repeat([0, 1], 3))
    feats = clustering.embed_timm("resnet10t", False, ds)
    assert feats.shape == (6, 512) and np.isfinite(feats).all()
    with pytest.raises(MVCError, match="sampling.pretrained=false"):
        clustering.embed_timm("resnet10t", True, ds)  # HF_HUB_OFFLINE, no cached weights (tests run offline)


def test_generation_with_clusters_samples_kept_sources_and_records_them(tmp_path, base):
    from mvc.diffusion.models import load_ip2p_pipeline
    from mvc.generation.generate import generate_synthetic

    ds = toy(np.repeat([0, 1], 6))
    caps = {i: "dark small" for i in ds.ids}
    over = {"generate.method": "mvc", "generate.model_dir": str(base), "generate.multiplier": 1.0,
            "generate.per_class": None, "sampling.keep_fraction": 0.5}
    cfg = stage_cfg(tmp_path, base, **over)
    pipe = load_ip2p_pipeline(base, "euler_ancestral")
    summary = generate_synthetic(cfg, labelled=ds, captions=caps, pipe=pipe, progress=False)
    paths = RunPaths.of(cfg)
    assert paths.synthetic.name == "synthetic_clusters" and summary["made"] == 12
    g = concept_groups(cfg, ds, str(base))
    recs = read_jsonl(paths.synthetic / "metadata.jsonl")
    assert {r["source_index"] for r in recs} == set(g.kept_indices()) != set(range(12))
    assert all(r["cluster"] == g.concept_of(r["source_index"]).cluster for r in recs)
    assert [sum(r["label"] == c for r in recs) for c in (0, 1)] == [6, 6]
    settings = json.loads((paths.synthetic / "generation.json").read_text())["settings"]
    assert settings["sampling"]["key"] == g.key and settings["sampling"]["keep_fraction"] == 0.5
    # without clustering: no sampling key and no cluster field, in its own folder
    plain = stage_cfg(tmp_path, base, **{**over, "sampling.method": "none", "generate.per_class": 1})
    generate_synthetic(plain, labelled=ds, captions=caps, pipe=pipe, progress=False)
    assert "sampling" not in json.loads((RunPaths.of(plain).synthetic / "generation.json").read_text())["settings"]
    assert not any("cluster" in r for r in read_jsonl(RunPaths.of(plain).synthetic / "metadata.jsonl"))


#################################################################################
#                                   Config                                      #
#################################################################################

@pytest.mark.parametrize("key,value,match", [
    ("sampling.clusters_per_class", 0, "must be >= 1"), ("sampling.keep_fraction", 0.0, "must be > 0"),
    ("sampling.keep_fraction", 1.5, "must be <= 1"), ("sampling.min_coherence", -1.5, "must be >= -1"),
    ("sampling.max_spread", -0.1, "must be >= 0"), ("sampling.method", "kmeans", "unknown value"),
])
def test_sampling_config_ranges(key, value, match):
    with pytest.raises(MVCError, match=match):
        make_config(overrides={key: value})


def test_an_unknown_embedder_is_one_line_and_paths_keep_clusters_apart(tmp_path):
    with pytest.raises(MVCError, match="unknown embedder 'no_such_net'"):
        make_config(overrides={"sampling.method": "clusters", "sampling.embedder": "no_such_net"})
    p = RunPaths.of(make_config(overrides={"run.output_dir": str(tmp_path), "sampling.method": "clusters",
                                           "generate.method": "img2img"}))
    assert (p.mvc.name, p.final.parent.name, p.synthetic.name) == ("mvc_clusters", "mvc_clusters",
                                                                   "synthetic_img2img_clusters")
    p = RunPaths.of(make_config(overrides={"run.output_dir": str(tmp_path)}))
    assert (p.mvc.name, p.synthetic.name) == ("mvc", "synthetic")
