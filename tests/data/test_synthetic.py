"""The synthetic-set format: class indices the usual loaders agree on, records, ownership, reading, counting."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from PIL import Image

from mvc.core.utils import MVCError, read_jsonl
from mvc.data import ArraySource, ImageDataset
from mvc.data.synthetic import (
    SyntheticSet,
    class_folder,
    count_images,
    load_synthetic_set,
    make_record,
    plan_jobs,
    read_records,
)

# names whose alphabetical order is not the dataset's order, one that needs escaping, and a class
# (index 3) without labelled images, hence without synthetic ones
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
           "zebra", "Aardvark"]


def labelled_set(per_class: int = 2, empty: tuple[int, ...] = (3,)) -> ImageDataset:
    rng = np.random.default_rng(0)
    targets = [c for c in range(len(CLASSES)) if c not in empty for _ in range(per_class)]
    arr = rng.integers(0, 255, (len(targets), 8, 8), dtype=np.uint8)
    return ImageDataset("toy", "train", CLASSES, targets, [f"train/{i}" for i in range(len(targets))], ArraySource(arr))


def write_set(root, labelled, per_class: int = 2) -> tuple[SyntheticSet, list]:
    """A set written through the format's own writer (what every generator does), reconciled."""
    s = SyntheticSet(root)
    s.prepare({"method": "test", "seed": 0}, labelled.classes)
    jobs = plan_jobs(labelled, ["none"], per_class=per_class)
    for j in jobs:
        s.save_image(Image.new("RGB", (8, 8), (j.label * 20, 0, 0)), j)
        s.append(0, make_record(j, method="test"))
    s.reconcile(jobs)
    return s, jobs


def test_class_folders_sort_in_class_order():
    names = [class_folder(c, n, len(CLASSES)) for c, n in enumerate(CLASSES)]
    assert sorted(names) == names and len(set(names)) == len(names)
    assert names[0] == "000_T-shirt_top" and names[9] == "009_Ankle_boot"
    assert class_folder(5, "x", 1500) == "0005_x"  # wider indices for many classes


def test_torchvision_imagefolder_indices_equal_the_metadata_labels(tmp_path):
    from torchvision.datasets import ImageFolder

    labelled = labelled_set()
    s, jobs = write_set(tmp_path / "syn", labelled)
    meta = {r["file_name"]: r for r in read_jsonl(tmp_path / "syn" / "metadata.jsonl")}
    assert len(meta) == len(jobs) == 2 * (len(CLASSES) - 1)
    # the empty class keeps its folder, so no later index shifts
    assert (tmp_path / "syn" / class_folder(3, "Dress", len(CLASSES))).is_dir()
    ds = ImageFolder(str(tmp_path / "syn"), allow_empty=True)
    assert len(ds.classes) == len(CLASSES)
    for path, y in ds.samples:
        rel = path[len(str(tmp_path / "syn")) + 1:]
        assert meta[rel]["label"] == y and CLASSES[y] == meta[rel]["class_name"]
    # and the project's own reader agrees
    ours = load_synthetic_set(tmp_path / "syn", CLASSES)
    assert sorted(zip(ours.ids, ours.targets.tolist())) == sorted((r["file_name"], r["label"]) for r in meta.values())


def _has_datasets_library() -> bool:
    """The `datasets` library (not the repository's data folder, which Python would see as a namespace package)."""
    spec = importlib.util.find_spec("datasets")
    return spec is not None and spec.origin is not None


@pytest.mark.skipif(not _has_datasets_library(), reason="the `datasets` library is not installed")
def test_datasets_imagefolder_loader_reads_the_set(tmp_path):
    import os

    from datasets import load_dataset

    labelled = labelled_set()
    write_set(tmp_path / "syn", labelled)
    meta = {r["file_name"]: r for r in read_jsonl(tmp_path / "syn" / "metadata.jsonl")}
    # the documented call (data_files): metadata.jsonl is read, and its `label` column is the dataset's index
    ds = load_dataset("imagefolder", data_files={"train": f"{tmp_path / 'syn'}/**"}, split="train",
                      cache_dir=str(tmp_path / "hf-cache"))
    assert len(ds) == len(meta)
    for row in ds:
        rec = meta[os.path.relpath(row["image"].filename, tmp_path / "syn")]
        assert row["label"] == rec["label"] and row["class_name"] == rec["class_name"]
    # the plain data_dir call reads the records too (file names give it no split to guess)
    ds = load_dataset("imagefolder", data_dir=str(tmp_path / "syn"), split="train", cache_dir=str(tmp_path / "hf2"))
    assert "class_name" in ds.column_names and sorted(ds["label"]) == sorted(r["label"] for r in meta.values())


def test_rerun_owns_only_its_files(tmp_path):
    labelled = labelled_set()
    s, jobs = write_set(tmp_path / "syn", labelled)
    # a user's own file in a class folder: never deleted, the run refuses in one line
    mine = tmp_path / "syn" / jobs[0].folder / "mine.png"
    Image.new("RGB", (8, 8)).save(mine)
    with pytest.raises(MVCError, match="did not write") as e:
        s.reconcile(jobs)
    assert "\n" not in str(e.value) and mine.is_file()
    mine.unlink()
    # a smaller plan deletes our own images outside it, nothing else
    small = plan_jobs(labelled, ["none"], per_class=1)
    assert s.reconcile(small)["stale_removed"] == len(jobs) - len(small)
    assert count_images(tmp_path / "syn") == len(small)
    # a symbolic link inside the set is never followed
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    (tmp_path / "syn" / jobs[0].folder / "link.png").symlink_to(outside)
    with pytest.raises(MVCError, match="did not write"):
        s.reconcile(small)
    assert outside.is_file()
    (tmp_path / "syn" / jobs[0].folder / "link.png").unlink()
    # a planned image replaced by a user's file (its record still there): refused, the file kept as it is
    planned = tmp_path / "syn" / small[0].file
    Image.new("RGB", (8, 8), (1, 2, 3)).save(planned)
    with pytest.raises(MVCError, match=f"did not write.*{small[0].file}"):
        s.reconcile(small)
    assert Image.open(planned).getpixel((0, 0)) == (1, 2, 3)


def test_settings_guard_and_odd_entries(tmp_path):
    labelled = labelled_set()
    s, _ = write_set(tmp_path / "syn", labelled)
    with pytest.raises(MVCError, match="other settings"):
        SyntheticSet(tmp_path / "syn").prepare({"method": "test", "seed": 1}, CLASSES)
    # a record file that is a folder (a class named 'metadata.jsonl'...) is refused, not crashed on
    (tmp_path / "odd").mkdir()
    t = SyntheticSet(tmp_path / "odd")
    t.prepare({"method": "test", "seed": 0}, CLASSES)
    (tmp_path / "odd" / "metadata.jsonl").mkdir()
    with pytest.raises(MVCError, match="not a plain file"):
        SyntheticSet(tmp_path / "odd").prepare({"method": "test", "seed": 0}, CLASSES)


def test_reader_refuses_records_of_another_dataset(tmp_path):
    labelled = labelled_set()
    write_set(tmp_path / "syn", labelled)
    with pytest.raises(MVCError, match="outside"):
        read_records(tmp_path / "syn", CLASSES[:3])
    recs = read_jsonl(tmp_path / "syn" / "metadata.jsonl")
    (tmp_path / "syn" / "metadata.jsonl").write_text(json.dumps({**recs[0], "label": "x"}) + "\n")
    with pytest.raises(MVCError, match="not a class index"):
        read_records(tmp_path / "syn", CLASSES)
    assert len(load_synthetic_set(tmp_path / "nowhere", CLASSES)) == 0
