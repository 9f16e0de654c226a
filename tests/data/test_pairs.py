"""Index pairs: within-class, never self-paired, balanced counts, seeded, compact and fingerprinted files."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from mvc.core.utils import MVCError
from mvc.data import ArraySource, ImageDataset, low_data_subset
from mvc.data.pairs import Pairs, _derange_rows, build_pairs, load_pairs, save_pairs


def toy_dataset(counts: list[int], name: str = "toy") -> ImageDataset:
    """A tiny in-memory dataset with `counts[c]` images of class c (labels interleaved, not sorted)."""
    targets = np.repeat(np.arange(len(counts)), counts)
    targets = targets[np.random.default_rng(0).permutation(len(targets))]
    imgs = np.zeros((len(targets), 2, 2), np.uint8)
    return ImageDataset(name, "train", [f"class{c}" for c in range(len(counts))], targets,
                        [f"train/{i}" for i in range(len(targets))], ArraySource(imgs))


def test_pairs_same_class_never_self_and_balanced():
    ds = toy_dataset([7, 2, 13, 3])
    p = build_pairs(ds, rounds=5, seed=1)
    t = ds.targets
    assert p.cond.dtype == np.int32 and p.target.dtype == np.int32 and len(p) == 5 * len(ds)
    assert (t[p.cond] == t[p.target]).all()
    assert (p.cond != p.target).all()
    # both lists are `rounds` permutations per class: each image is a condition 5 times and a target 5 times
    assert np.bincount(p.cond, minlength=len(ds)).tolist() == [5] * len(ds)
    assert np.bincount(p.target, minlength=len(ds)).tolist() == [5] * len(ds)
    assert p.fingerprint == ds.fingerprint() and p.rounds == 5 and p.seed == 1


def test_pairs_never_self_paired_over_many_seeds():
    # small classes make fixed points (an image drawn against itself) frequent, with 1 or many per row
    t = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
    for seed in range(300):
        p = build_pairs(t, rounds=4, seed=seed)
        assert (p.cond != p.target).all() and (t[p.cond] == t[p.target]).all()


def test_derange_rows_keeps_permutations():
    rng = np.random.default_rng(0)
    n = 6
    p = np.tile(np.arange(n), (50, 1))
    q = p.copy()  # rows left as they are: every position fixed
    q[1::2] = rng.permuted(q[1::2], axis=1)  # some rows with 0/1/many fixed points
    q[0] = [1, 0, 2, 3, 5, 4]  # two fixed points (2, 3)
    q[2] = [1, 0, 3, 2, 4, 5]  # fixed at 4 and 5
    q[4] = [1, 2, 0, 4, 5, 3]  # none fixed
    q[6] = [0, 2, 1, 4, 5, 3]  # exactly one fixed (position 0)
    out = _derange_rows(p, q, rng)
    assert (out != p).all()
    assert (np.sort(out, axis=1) == np.arange(n)).all()
    assert (out[4] == q[4]).all()  # rows without fixed points are untouched


def test_pairs_deterministic_and_seed_dependent():
    ds = toy_dataset([20, 20, 20])
    a, b = build_pairs(ds, 3, seed=7), build_pairs(ds, 3, seed=7)
    assert np.array_equal(a.cond, b.cond) and np.array_equal(a.target, b.target)
    c = build_pairs(ds, 3, seed=8)
    assert not np.array_equal(a.target, c.target)
    # rounds differ: the same pair list is not just repeated
    per_round = a.cond[:20], a.cond[20:40]
    assert not np.array_equal(*per_round)
    assert build_pairs(ds, 3, seed=None).seed >= 0  # seed=None draws a seed and records it


def test_small_class_error_or_skip(caplog):
    ds = toy_dataset([5, 1, 4, 0])
    with pytest.raises(MVCError, match=r"'class1' \(class 1\): 1 image.*'class3' \(class 3\): 0 image"):
        build_pairs(ds, 2, seed=0)
    with caplog.at_level(logging.WARNING):
        p = build_pairs(ds, 2, seed=0, on_small_class="skip")
    warns = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warns) == 1 and "class1" in warns[0] and "class3" in warns[0]
    assert set(ds.targets[p.cond].tolist()) == {0, 2} and len(p) == 2 * (5 + 4) and p.skipped_classes == [1, 3]
    with pytest.raises(MVCError, match="nothing to pair"):
        build_pairs(toy_dataset([1, 1]), 2, seed=0, on_small_class="skip")
    with pytest.raises(MVCError, match="on_small_class"):
        build_pairs(ds, 2, seed=0, on_small_class="ignore")
    with pytest.raises(MVCError, match="rounds"):
        build_pairs(ds, 0, seed=0)


def test_pairs_index_the_subset_they_were_drawn_from():
    full = toy_dataset([30, 30])
    lab, _ = low_data_subset(full, 4, seed=0)
    p = build_pairs(lab, 2, seed=0)
    assert p.cond.max() < len(lab) and p.fingerprint == lab.fingerprint() != full.fingerprint()


def test_save_load_round_trip_and_fingerprint_check(tmp_path):
    ds = toy_dataset([6, 9])
    p = build_pairs(ds, 3, seed=2)
    path = tmp_path / "run" / "pairs.npz"
    save_pairs(path, p)
    q = load_pairs(path, expected_fingerprint=ds.fingerprint())
    assert isinstance(q, Pairs) and q.cond.dtype == np.int32
    assert np.array_equal(q.cond, p.cond) and np.array_equal(q.target, p.target)
    assert (q.fingerprint, q.rounds, q.seed) == (p.fingerprint, 3, 2)
    assert sorted(x.name for x in path.parent.iterdir()) == ["pairs.npz"]  # no temp file left behind
    other = toy_dataset([6, 9], name="other")
    with pytest.raises(MVCError, match="drawn for dataset/subset"):
        load_pairs(path, expected_fingerprint=other.fingerprint())
    assert load_pairs(path, ds.fingerprint(), rounds=3, seed=2).rounds == 3
    with pytest.raises(MVCError, match="pairs.rounds=3, not 4"):
        load_pairs(path, ds.fingerprint(), rounds=4)
    with pytest.raises(MVCError, match="pairs.seed=2, not 5"):
        load_pairs(path, seed=5)
    # a path without the .npz suffix is written exactly where asked
    save_pairs(tmp_path / "pairs.bin", p)
    assert np.array_equal(load_pairs(tmp_path / "pairs.bin").target, p.target)


def test_load_pairs_missing_or_corrupt(tmp_path):
    with pytest.raises(MVCError, match="not found"):
        load_pairs(tmp_path / "none.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(MVCError, match="not a readable pairs file"):
        load_pairs(bad)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, cond=np.zeros(3, np.int64), target=np.zeros(3, np.int64), fingerprint=np.array("x"),
             rounds=np.array(1), seed=np.array(0))
    with pytest.raises(MVCError, match="int32"):
        load_pairs(wrong)


def test_one_million_pairs_under_10mb(tmp_path):
    """1M pairs fit in 10 MB (draw time is measured in bench/bench_pairs.py)."""
    targets = np.repeat(np.arange(10), 10_000)  # 100k images x 10 rounds = 1,000,000 pairs
    p = build_pairs(targets, rounds=10, seed=0, fingerprint="abc")
    assert len(p) == 1_000_000 and (p.cond != p.target).all() and (targets[p.cond] == targets[p.target]).all()
    path = tmp_path / "pairs.npz"
    save_pairs(path, p)
    size = path.stat().st_size
    assert 8_000_000 <= size <= 10_000_000, size
    assert load_pairs(path, "abc").fingerprint == "abc"
