"""Tiny ImageNet: its release's layout read into an `ImageDataset` (classes from wnids.txt, names from words.txt,
train labels from the folders, test labels from val/val_annotations.txt, test/ never read), and its bad inputs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mvc.core.config import make_config
from mvc.core.utils import MVCError
from mvc.data import build_dataset, describe_eval_split, load_splits

# wnids.txt's order is not sorted order, so a reader that sorts the classes gets them wrong
WNIDS = ["n02124075", "n01443537", "n04067472"]
WORDS = {"n01443537": "goldfish, Carassius auratus",
         "n02124075": "Egyptian_cat",
         "n04067472": "reel",
         "n09999999": "not a class here"}
NAMES = ["Egyptian cat", "goldfish", "reel"]


def colour(c: int) -> tuple[int, int, int]:
    """A distinct solid colour per class index."""
    return (30 + 50 * c % 226, 220 - 40 * c % 200, 60 + 70 * c % 190)


def write_tiny_imagenet(root: Path, wnids: list[str] = WNIDS, words: dict[str, str] = WORDS, train: int = 4,
                        val: int = 2, color=colour, size: int = 8) -> Path:
    """`root/tiny-imagenet-200/` in the release's layout: solid-colour JPEGs of class `color(index)`, val images
    interleaved across classes (val_0 is class 0, val_1 class 1, ...), and an unlabelled test/ folder."""
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True, exist_ok=True)
    (base / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    (base / "words.txt").write_text("".join(f"{w}\t{n}\n" for w, n in words.items()))

    def jpeg(path: Path, c: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (size, size), tuple(color(c))).save(path, quality=95)

    for c, w in enumerate(wnids):
        boxes = []
        for i in range(train):
            jpeg(base / "train" / w / "images" / f"{w}_{i}.JPEG", c)
            boxes.append(f"{w}_{i}.JPEG\t0\t0\t{size - 1}\t{size - 1}\n")
        (base / "train" / w / f"{w}_boxes.txt").write_text("".join(boxes))
    lines = []
    for i in range(val * len(wnids)):
        c = i % len(wnids)
        jpeg(base / "val" / "images" / f"val_{i}.JPEG", c)
        lines.append(f"val_{i}.JPEG\t{wnids[c]}\t0\t0\t{size - 1}\t{size - 1}\n")
    (base / "val" / "val_annotations.txt").write_text("".join(lines))
    for i in range(3):  # unlabelled, in a colour no class has
        jpeg(base / "test" / "images" / f"test_{i}.JPEG", 97)
    return root


def mean_colour(img: Image.Image) -> np.ndarray:
    return np.asarray(img).reshape(-1, 3).mean(0)


def test_reads_classes_names_and_labels_of_both_splits(tmp_path):
    write_tiny_imagenet(tmp_path)
    train = build_dataset("tiny_imagenet", tmp_path, "train")
    test = build_dataset("tiny_imagenet", tmp_path, "test")
    for ds in (train, test):
        assert ds.classes == NAMES  # wnids.txt's order, words.txt's first synonym with "_" as a space
    assert len(train) == 12 and train.class_counts().tolist() == [4, 4, 4]
    assert train.ids[:2] == ["train/n02124075/images/n02124075_0.JPEG", "train/n02124075/images/n02124075_1.JPEG"]
    assert len(test) == 6 and test.targets.tolist() == [0, 1, 2, 0, 1, 2]  # val_annotations.txt's labels
    assert test.ids == [f"val/images/val_{i}.JPEG" for i in range(6)]  # test/ is never read
    for ds in (train, test):
        for i in range(len(ds)):
            img, y = ds[i]
            assert np.abs(mean_colour(img) - np.array(colour(y))).max() < 6, (ds.split, ds.ids[i])
    assert build_dataset("tiny_imagenet", tmp_path, "test").fingerprint() == test.fingerprint()
    assert train.fingerprint() != test.fingerprint()


def test_labels_follow_the_annotations_not_the_file_names(tmp_path):
    write_tiny_imagenet(tmp_path)
    ann = tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    lines = ann.read_text().splitlines()
    lines[0] = lines[0].replace(WNIDS[0], WNIDS[2])  # val_0 (class-0 colour) now labelled class 2
    ann.write_text("\n".join(lines) + "\n")
    test = build_dataset("tiny_imagenet", tmp_path, "test")
    assert test.targets[0] == 2 and test.targets.tolist()[1:] == [1, 2, 0, 1, 2]


def test_shared_first_synonyms_stay_distinct(tmp_path):
    words = {"n1": "crane", "n2": "crane, derrick", "n3": "crane"}
    write_tiny_imagenet(tmp_path, wnids=["n1", "n2", "n3"], words=words, train=1, val=1)
    assert build_dataset("tiny_imagenet", tmp_path, "train").classes == ["crane (n1)", "derrick", "crane (n3)"]


def test_labelled_subset_is_drawn_from_train_seeded_and_per_class(tmp_path):
    write_tiny_imagenet(tmp_path, train=6, val=2)

    def splits(seed):
        cfg = make_config({"data": {"name": "tiny_imagenet", "root": str(tmp_path), "k_per_class": 2,
                                    "subset_seed": seed}})
        return load_splits(cfg.data), cfg

    (labelled, pool, test), cfg = splits(0)
    assert labelled.class_counts().tolist() == [2, 2, 2] and pool.class_counts().tolist() == [4, 4, 4]
    assert all(i.startswith("train/") for i in labelled.ids + pool.ids) and not set(labelled.ids) & set(pool.ids)
    assert test.split == "test" and all(i.startswith("val/images/") for i in test.ids) and len(test) == 6
    assert splits(0)[0][0].ids == labelled.ids  # the same seed, the same draw
    drawn = {tuple(splits(s)[0][0].ids) for s in range(1, 6)}
    assert drawn - {tuple(labelled.ids)}  # other seeds draw other images
    assert "val split" in describe_eval_split(cfg.data) and "no labels" in describe_eval_split(cfg.data)


def _error(tmp_path, split="train") -> str:
    with pytest.raises(MVCError) as e:
        build_dataset("tiny_imagenet", tmp_path, split)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_wnids_is_one_line(tmp_path):
    assert "tiny-imagenet-200/wnids.txt" in _error(tmp_path)  # nothing there at all
    write_tiny_imagenet(tmp_path)
    (tmp_path / "tiny-imagenet-200" / "wnids.txt").unlink()
    msg = _error(tmp_path, "test")
    assert msg.startswith("tiny_imagenet not found") and str(tmp_path / "tiny-imagenet-200" / "wnids.txt") in msg


def test_annotation_naming_an_unknown_wnid_is_one_line(tmp_path):
    write_tiny_imagenet(tmp_path)
    ann = tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    lines = ann.read_text().splitlines()
    lines[3] = lines[3].replace(WNIDS[0], "n09999999")  # in words.txt, but not one of wnids.txt's classes
    ann.write_text("\n".join(lines) + "\n")
    msg = _error(tmp_path, "test")
    assert "line 4" in msg and "'n09999999'" in msg and "not in wnids.txt" in msg
    assert len(build_dataset("tiny_imagenet", tmp_path, "train")) == 12  # train does not read the annotations


def test_annotated_image_that_is_missing_is_one_line(tmp_path):
    write_tiny_imagenet(tmp_path)
    (tmp_path / "tiny-imagenet-200" / "val" / "images" / "val_4.JPEG").unlink()
    msg = _error(tmp_path, "test")
    assert "line 5" in msg and "val_4.JPEG does not exist" in msg


@pytest.mark.parametrize("damage, expect", [
    ("words", "words.txt not found"),
    ("unnamed", "no name for class(es) n04067472"),
    ("annotations", "val_annotations.txt not found"),
    ("short_line", "line 2: expected 'file<TAB>wnid<TAB>box'"),
    ("twice", "line 2: val_0.JPEG is labelled twice"),
    ("escape", "is not a file name inside"),
])
def test_other_bad_inputs_are_one_line(tmp_path, damage, expect):
    write_tiny_imagenet(tmp_path)
    base = tmp_path / "tiny-imagenet-200"
    ann = base / "val" / "val_annotations.txt"
    lines = ann.read_text().splitlines()
    if damage == "words":
        (base / "words.txt").unlink()
    elif damage == "unnamed":
        (base / "words.txt").write_text("".join(f"{w}\t{n}\n" for w, n in WORDS.items() if w != "n04067472"))
    elif damage == "annotations":
        ann.unlink()
    elif damage == "short_line":
        ann.write_text("\n".join([lines[0], "val_1.JPEG", *lines[2:]]) + "\n")
    elif damage == "twice":
        ann.write_text("\n".join([lines[0], lines[0], *lines[2:]]) + "\n")
    elif damage == "escape":
        ann.write_text("\n".join([lines[0], lines[1].replace("val_1.JPEG", "../../wnids.txt"), *lines[2:]]) + "\n")
    assert expect in _error(tmp_path, "test")


def test_bad_files_are_skipped_with_one_warning(tmp_path, caplog):
    write_tiny_imagenet(tmp_path)
    base = tmp_path / "tiny-imagenet-200"
    (base / "train" / WNIDS[1] / "images" / f"{WNIDS[1]}_9.JPEG").write_bytes(b"")  # zero bytes
    (base / "val" / "images" / "val_2.JPEG").write_bytes(b"<html>not a picture</html>")
    (base / "val" / "images" / "val_99.JPEG").write_bytes(b"")  # no annotation: ignored
    with caplog.at_level(logging.WARNING):
        train = build_dataset("tiny_imagenet", tmp_path, "train")
        test = build_dataset("tiny_imagenet", tmp_path, "test")
    assert len(train) == 12 and len(test) == 5 and "val/images/val_2.JPEG" not in test.ids
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert all("\n" not in w for w in warnings)
    assert any(f"{WNIDS[1]}_9.JPEG (empty file)" in w for w in warnings)
    assert any("val_2.JPEG" in w and "skipping 1" in w for w in warnings)
    assert any("val_99.JPEG" in w and "without a label" in w for w in warnings)
