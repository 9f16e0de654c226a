"""Datasets: every registered layout read from on-disk fixtures, subsets, splits, and bad input."""

from __future__ import annotations

import gzip
import logging
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mvc.data.images as images_mod
import mvc.data.sources as sources
from mvc.core.config import make_config
from mvc.core.utils import MVCError, safe_join, safe_name
from mvc.data import DATASETS, ImageDataset, build_dataset, list_datasets, load_rgb, load_splits, low_data_subset
from tests.data.test_tiny_imagenet import NAMES as TINY_IMAGENET_NAMES
from tests.data.test_tiny_imagenet import write_tiny_imagenet
from tests.helpers import no_hang, write_idx

#################################################################################
#                     Fixtures in each dataset's real format                    #
#################################################################################

N_PER_CLASS = {"train": 4, "test": 2}


def class_color(c: int) -> tuple[int, int, int]:
    """A distinct solid colour per class, so a test can tell an image's class from its pixels."""
    return (30 + 50 * c % 226, 220 - 40 * c % 200, 60 + 70 * c % 190)


def write_image(path: Path, color, size=(8, 8), fmt=None) -> None:
    """A solid-colour RGB image file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, tuple(color)).save(path, format=fmt)


def pattern_images(labels: np.ndarray, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """uint8 images whose pixels differ by position (catches transposes) and by label."""
    rng = np.random.default_rng(seed)
    out = rng.integers(0, 256, size=(len(labels), *shape), dtype=np.uint8)
    out[:, 0, 0] = (labels * 20)[:, None] if len(shape) == 3 else labels * 20  # label readable at (0, 0)
    return out


def _write_pickle(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_cifar10(root: Path) -> dict:
    """cifar-10-batches-py with 5 train batches (bytes keys, as pickled by Python 2) and a test batch."""
    base = root / "cifar-10-batches-py"
    classes = [f"c10_{i}" for i in range(10)]
    _write_pickle(base / "batches.meta", {b"label_names": [c.encode() for c in classes]})
    expected = {}
    for split, files in {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}.items():
        imgs, labs = [], []
        for j, f in enumerate(files):
            lab = np.arange(10).repeat(1 if split == "train" else 2)
            hwc = pattern_images(lab, (32, 32, 3), seed=j + (0 if split == "train" else 10))
            _write_pickle(base / f, {b"data": hwc.transpose(0, 3, 1, 2).reshape(len(lab), -1), b"labels": lab.tolist()})
            imgs.append(hwc)
            labs.append(lab)
        expected[split] = (np.concatenate(imgs), np.concatenate(labs))
    return {"classes": classes, "arrays": expected}


def make_cifar100(root: Path) -> dict:
    """cifar-100-python/{train,test,meta} with str keys."""
    base = root / "cifar-100-python"
    classes = [f"c100_{i}" for i in range(100)]
    _write_pickle(base / "meta", {"fine_label_names": classes, "coarse_label_names": [f"s{i}" for i in range(20)]})
    expected = {}
    for split, rep in (("train", 2), ("test", 1)):
        lab = np.arange(100).repeat(rep)
        hwc = pattern_images(lab, (32, 32, 3), seed=rep)
        _write_pickle(base / split, {"data": hwc.transpose(0, 3, 1, 2).reshape(len(lab), -1),
                                     "fine_labels": lab.tolist(), "coarse_labels": (lab // 5).tolist()})
        expected[split] = (hwc, lab)
    return {"classes": classes, "arrays": expected}


def make_fashion_mnist(root: Path, folder: str = "fashion_mnist", gz: bool = True) -> dict:
    """Fashion-MNIST idx files (gzip by default) for both splits."""
    expected = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        lab = np.tile(np.arange(10, dtype=np.uint8), N_PER_CLASS[split])
        imgs = pattern_images(lab.astype(np.int64), (28, 28), seed=len(lab))
        sfx = ".gz" if gz else ""
        write_idx(root / folder / f"{prefix}-images-idx3-ubyte{sfx}", imgs, 2051, gz)
        write_idx(root / folder / f"{prefix}-labels-idx1-ubyte{sfx}", lab, 2049, gz)
        expected[split] = (imgs, lab.astype(np.int64))
    return {"classes": sources.FASHION_CLASSES, "arrays": expected}


def make_class_tree(split_dir: Path, classes: list[str], n: int, ext: str = ".jpg") -> None:
    """`split_dir/<class>/img_XX<ext>` solid-colour images."""
    for c, name in enumerate(classes):
        for i in range(n):
            write_image(split_dir / name / f"img_{i:02d}{ext}", class_color(c))


def make_brain_tumor(root: Path) -> dict:
    classes = ["glioma", "meningioma", "notumor", "pituitary"]
    for split, folder in (("train", "Training"), ("test", "Testing")):
        make_class_tree(root / "brain_tumor" / folder, classes, N_PER_CLASS[split])
    return {"classes": classes}


def make_caltech101(root: Path) -> dict:
    classes = ["Faces", "accordion", "airplanes"]
    base = root / "caltech101" / "101_ObjectCategories"
    make_class_tree(base, classes, 5)
    make_class_tree(base, ["BACKGROUND_Google"], 3)
    return {"classes": classes}


def make_imagefolder(root: Path) -> dict:
    classes = ["cat", "dog", "zebra"]
    for split in ("train", "test"):
        make_class_tree(root / split, classes, N_PER_CLASS[split], ext=".png")
    return {"classes": classes}


def make_tiny_imagenet(root: Path) -> dict:
    write_tiny_imagenet(root, train=N_PER_CLASS["train"], val=N_PER_CLASS["test"], color=class_color)
    return {"classes": TINY_IMAGENET_NAMES}


MAKERS = {"cifar10": make_cifar10, "cifar100": make_cifar100, "caltech101": make_caltech101,
          "brain_tumor": make_brain_tumor, "fashion_mnist": make_fashion_mnist, "imagefolder": make_imagefolder,
          "tiny_imagenet": make_tiny_imagenet}


def test_makers_cover_registry():
    assert sorted(MAKERS) == sorted(list_datasets())


#################################################################################
#                        Registry: every dataset, real layout                   #
#################################################################################

@pytest.mark.parametrize("name", sorted(MAKERS))
def test_registry_reads_every_dataset(name, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "SYSTEM_FASHION_MNIST", tmp_path / "no-system-copy")
    info = MAKERS[name](tmp_path)
    fps = set()
    for split in ("train", "test"):
        ds = build_dataset(name, tmp_path, split)
        assert isinstance(ds, ImageDataset) and ds.name == name and ds.split == split
        assert ds.classes == info["classes"] and all(isinstance(c, str) for c in ds.classes)
        assert ds.targets.dtype == np.int64 and len(ds.targets) == len(ds) == len(ds.ids) > 0
        assert len(set(ds.ids)) == len(ds.ids) and all(isinstance(i, str) for i in ds.ids)
        for i in (0, len(ds) - 1):
            img, y = ds[i]
            assert isinstance(img, Image.Image) and img.mode == "RGB" and isinstance(y, int)
            assert y == ds.targets[i] and np.array_equal(np.asarray(ds.load_image(i)), np.asarray(img))
            if "arrays" in info:  # the exact pixels written, in the right orientation and order
                arr, lab = info["arrays"][split]
                want = arr[i] if arr.ndim == 4 else np.repeat(arr[i][..., None], 3, axis=2)
                assert np.array_equal(np.asarray(img), want) and y == lab[i]
            else:  # solid colour of the image's class (JPEG: within a few levels)
                got = np.asarray(img).reshape(-1, 3).mean(0)
                assert np.abs(got - np.array(class_color(y))).max() < 6
        # fingerprints: stable across rebuilds, different between splits
        assert build_dataset(name, tmp_path, split).fingerprint() == ds.fingerprint()
        fps.add(ds.fingerprint())
    assert len(fps) == 2


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_missing_data_is_one_clear_error(name, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "SYSTEM_FASHION_MNIST", tmp_path / "no-system-copy")
    kw = {"download": False} if name == "fashion_mnist" else {}
    with pytest.raises(MVCError) as e:
        build_dataset(name, tmp_path / "empty", "train", **kw)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "empty") in msg


def test_unknown_dataset_split_and_option():
    with pytest.raises(MVCError, match="choose one of.*cifar10.*imagefolder"):
        build_dataset("mnist", "x", "train")
    with pytest.raises(MVCError, match="no split 'val'"):
        build_dataset("cifar10", "x", "val")
    with pytest.raises(MVCError, match="does not take option"):
        build_dataset("cifar10", "x", "train", colour=True)


def test_list_datasets_is_cheap():
    # a fresh interpreter: importing mvc.data must not import torchvision or PIL
    code = "import sys, mvc.data; mvc.data.list_datasets(); print('torchvision' in sys.modules, 'PIL' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], check=True).stdout.split()
    assert out == ["False", "False"]


#################################################################################
#                                Fashion-MNIST                                  #
#################################################################################

def test_fashion_mnist_search_order_and_raw_files(tmp_path, monkeypatch):
    system = tmp_path / "system"
    make_fashion_mnist(tmp_path, folder="system")  # stands in for /usr/share/datasets/fashion-mnist
    monkeypatch.setattr(sources, "SYSTEM_FASHION_MNIST", system)
    root = tmp_path / "root"
    sys_ds = build_dataset("fashion_mnist", root, "train", download=False)
    # torchvision's raw folder (uncompressed idx files) wins over the system copy
    info = make_fashion_mnist(root, folder="FashionMNIST/raw", gz=False)
    ds = build_dataset("fashion_mnist", root, "train", download=False)
    assert np.array_equal(ds.source.images, info["arrays"]["train"][0])
    assert ds.source.images.dtype == np.uint8 and ds.source.images.shape[1:] == (28, 28)
    assert len(ds) == len(sys_ds) and ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"


def test_fashion_mnist_failed_download_is_clear(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "SYSTEM_FASHION_MNIST", tmp_path / "none")

    def offline(*a, **k):
        raise OSError("network unreachable")
    fake = types.SimpleNamespace(datasets=types.SimpleNamespace(FashionMNIST=offline))
    monkeypatch.setitem(sys.modules, "torchvision", fake)  # the hub edge: no real download in tests
    with pytest.raises(MVCError, match="download failed"):
        build_dataset("fashion_mnist", tmp_path, "train")


@pytest.mark.parametrize("damage", ["magic", "truncated", "not_gzip"])
def test_fashion_mnist_bad_idx(tmp_path, monkeypatch, damage):
    monkeypatch.setattr(sources, "SYSTEM_FASHION_MNIST", tmp_path / "none")
    make_fashion_mnist(tmp_path)
    p = tmp_path / "fashion_mnist" / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(p.read_bytes())
    if damage == "magic":
        p.write_bytes(gzip.compress(b"\x00\x00\x00\x01" + raw[4:]))
    elif damage == "truncated":
        p.write_bytes(gzip.compress(raw[:-10]))
    else:
        p.write_bytes(b"definitely not gzip")
    with pytest.raises(MVCError, match="train-images-idx3-ubyte.gz"):
        build_dataset("fashion_mnist", tmp_path, "train", download=False)


@pytest.mark.skipif(not sources.SYSTEM_FASHION_MNIST.is_dir(), reason="Debian fashion-mnist package not installed")
def test_fashion_mnist_system_package_is_found_and_kept_compact():
    """The Debian copy is used when the root has none, held as one uint8 array (load speed: bench/)."""
    ds = build_dataset("fashion_mnist", "/nonexistent-root", "train", download=False)
    assert len(ds) == 60000 and ds.source.images.shape == (60000, 28, 28) and ds.source.images.dtype == np.uint8
    assert np.bincount(ds.targets).tolist() == [6000] * 10


#################################################################################
#                                    CIFAR                                      #
#################################################################################

def test_cifar_refuses_code_in_pickles(tmp_path):
    make_cifar10(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    _write_pickle(tmp_path / "cifar-10-batches-py" / "data_batch_3", {"data": Evil(), "labels": [0]})
    with pytest.raises(MVCError, match="data_batch_3"):
        build_dataset("cifar10", tmp_path, "train")
    assert not marker.exists()


def test_cifar_corrupt_batch(tmp_path):
    make_cifar100(tmp_path)
    (tmp_path / "cifar-100-python" / "test").write_bytes(b"\x80\x02garbage")
    with pytest.raises(MVCError, match="cifar-100-python/test"):
        build_dataset("cifar100", tmp_path, "test")


#################################################################################
#                        Caltech101 split, imagefolder val                      #
#################################################################################

def test_caltech_split_is_seeded_stratified_and_disjoint(tmp_path):
    root = tmp_path
    base = root / "caltech101" / "101_ObjectCategories"
    make_class_tree(base, ["a", "b"], 10)
    make_class_tree(base, ["one"], 1)
    make_class_tree(base, ["BACKGROUND_Google"], 2)
    train = build_dataset("caltech101", root, "train")
    test = build_dataset("caltech101", root, "test")
    assert train.classes == ["a", "b", "one"]
    assert not set(train.ids) & set(test.ids) and len(train) + len(test) == 21
    assert test.class_counts().tolist() == [2, 2, 0]  # 20% of 10; a single image stays in train
    assert build_dataset("caltech101", root, "test").ids == test.ids
    other = build_dataset("caltech101", root, "test", split_seed=1, test_fraction=0.5)
    assert other.class_counts().tolist() == [5, 5, 0] and other.ids != test.ids
    with pytest.raises(MVCError, match="test_fraction"):
        build_dataset("caltech101", root, "test", test_fraction=1.5)


def test_imagefolder_val_split_and_unknown_test_class(tmp_path):
    make_imagefolder(tmp_path)
    make_class_tree(tmp_path / "val", ["dog"], 2)
    val = build_dataset("imagefolder", tmp_path, "val")
    assert val.classes == ["cat", "dog", "zebra"] and set(val.targets.tolist()) == {1}
    make_class_tree(tmp_path / "test", ["lion"], 1)
    with pytest.raises(MVCError, match="lion.*not among the training classes"):
        build_dataset("imagefolder", tmp_path, "test")


#################################################################################
#                           Low-data subsets and splits                         #
#################################################################################

def _array_ds(counts: list[int]) -> ImageDataset:
    from mvc.data import ArraySource

    targets = np.repeat(np.arange(len(counts)), counts)
    imgs = np.zeros((len(targets), 4, 4), np.uint8)
    return ImageDataset("toy", "train", [f"k{c}" for c in range(len(counts))], targets,
                        [f"train/{i}" for i in range(len(targets))], ArraySource(imgs))


def test_low_data_subset_counts_disjoint_deterministic():
    ds = _array_ds([30, 25, 40])
    lab, pool = low_data_subset(ds, 5, seed=3)
    assert lab.class_counts().tolist() == [5, 5, 5] and pool.class_counts().tolist() == [25, 20, 35]
    assert not set(lab.ids) & set(pool.ids) and sorted(lab.ids + pool.ids) == sorted(ds.ids)
    assert lab.classes == ds.classes and lab.name == ds.name
    lab2, _ = low_data_subset(ds, 5, seed=3)
    assert lab2.ids == lab.ids and lab2.fingerprint() == lab.fingerprint()
    lab3, _ = low_data_subset(ds, 5, seed=4)
    assert lab3.ids != lab.ids and lab3.fingerprint() != lab.fingerprint()
    # the view maps back to the right source images and labels
    j = ds.ids.index(lab.ids[0])
    assert lab.targets[0] == ds.targets[j] and lab.index[0] == ds.index[j]


def test_low_data_subset_small_class_all_and_none(caplog):
    ds = _array_ds([10, 2, 0])
    with caplog.at_level(logging.WARNING):
        lab, pool = low_data_subset(ds, 4, seed=0)
    assert lab.class_counts().tolist() == [4, 2, 0] and pool.class_counts().tolist() == [6, 0, 0]
    warns = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warns) == 1 and "'k1' (2)" in warns[0].getMessage() and "'k2' (0)" in warns[0].getMessage()
    lab, pool = low_data_subset(ds, None, seed=0)
    assert len(lab) == len(ds) and len(pool) == 0
    with pytest.raises(MVCError, match="k_per_class"):
        low_data_subset(ds, 0, seed=0)
    lab, _ = low_data_subset(ds, 3, seed=None)  # seed=None works (a fresh seed)
    assert lab.class_counts().tolist() == [3, 2, 0]


def test_load_splits_test_and_val(tmp_path):
    root = tmp_path / "mine"
    make_class_tree(root / "train", ["a", "b"], 12, ext=".png")
    make_class_tree(root / "test", ["a", "b"], 2, ext=".png")
    cfg = make_config(overrides={"data.name": "imagefolder", "data.root": str(root), "data.k_per_class": 3})
    lab, pool, test = load_splits(cfg.data)
    assert lab.class_counts().tolist() == [3, 3] and len(pool) == 18 and test.split == "test" and len(test) == 4
    cfg = make_config(overrides={"data.name": "imagefolder", "data.root": str(root), "data.k_per_class": 3,
                                 "data.test_split": "val", "data.val_fraction": 0.2})
    lab2, pool2, val = load_splits(cfg.data)
    assert lab2.ids == lab.ids and val.split == "val" and val.class_counts().tolist() == [2, 2]
    assert not (set(val.ids) & set(pool2.ids)) and not (set(val.ids) & set(lab2.ids))
    assert len(pool2) + len(val) == len(pool) and val.fingerprint() != pool2.fingerprint()
    # a real val/ folder is used as is
    make_class_tree(root / "val", ["a", "b"], 1, ext=".png")
    _, pool3, val3 = load_splits(cfg.data)
    assert len(val3) == 2 and len(pool3) == len(pool) and all(i.startswith("val/") for i in val3.ids)


def test_subset_view_bounds():
    ds = _array_ds([3, 3])
    sub = ds.subset([5, 0])
    assert sub.ids == ["train/5", "train/0"] and sub.targets.tolist() == [1, 0]
    assert sub.subset([1]).ids == ["train/0"]
    with pytest.raises(IndexError):
        ds.subset([6])
    with pytest.raises(IndexError):
        ds.load_image(6)


#################################################################################
#                                  Bad input                                    #
#################################################################################

def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_bad_files_skipped_with_one_warning(tmp_path, caplog):
    root = tmp_path
    make_class_tree(root / "train", ["a", "b"], 2)
    bad = root / "train" / "a"
    (bad / "zero.png").write_bytes(b"")
    (bad / "corrupt.jpg").write_bytes(os.urandom(300))
    (bad / "notes.txt").write_text("not an image")
    (bad / "fake.png").write_text("<html>a web page saved as png</html>")
    good = root / "train" / "b" / "img_00.jpg"
    png = root / "png_source.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(png)
    (bad / "truncated.png").write_bytes(png.read_bytes()[:200])
    (bad / ".DS_Store").write_bytes(b"\x00\x01")  # hidden files are ignored silently
    with caplog.at_level(logging.WARNING):
        ds = build_dataset("imagefolder", root, "train")
    assert len(ds) == 4 and ds.class_counts().tolist() == [2, 2]
    warns = _warnings(caplog)
    assert len(warns) == 1 and "\n" not in warns[0]
    for name in ("zero.png", "corrupt.jpg", "notes.txt", "fake.png", "truncated.png"):
        assert name in warns[0]
    assert ".DS_Store" not in warns[0] and str(good) not in warns[0]


def test_truncated_jpeg_that_passes_verify_fails_clearly_on_load(tmp_path):
    make_class_tree(tmp_path / "train", ["a"], 1)
    src = tmp_path / "src.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(src)
    p = tmp_path / "train" / "a" / "cut.jpg"
    p.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    ds = build_dataset("imagefolder", tmp_path, "train")
    assert "train/a/cut.jpg" in ds.ids  # the header is intact, so indexing keeps it
    with pytest.raises(MVCError, match="cut.jpg") as e:
        ds[ds.ids.index("train/a/cut.jpg")]
    assert "\n" not in str(e.value)


def test_image_modes_are_converted_to_rgb(tmp_path):
    d = tmp_path / "train" / "modes"
    d.mkdir(parents=True)
    Image.new("L", (4, 4), 77).save(d / "gray.png")
    Image.new("1", (4, 4), 1).save(d / "bilevel.png")
    rgba = Image.new("RGBA", (4, 4), (10, 200, 30, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))          # fully transparent -> white
    rgba.putpixel((1, 0), (0, 0, 0, 128))        # half transparent black on white -> ~127
    rgba.save(d / "rgba.png")
    Image.new("LA", (4, 4), (0, 0)).save(d / "la.png")
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.save(d / "palette.png")
    palt = Image.new("P", (4, 4), 0)
    palt.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palt.info["transparency"] = 0
    palt.save(d / "palette_transparent.png", transparency=0)
    Image.fromarray(np.array([[0, 65535], [32896, 257]], dtype=np.uint16)).save(d / "sixteen.png")
    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(d / "cmyk.jpg")
    Image.new("RGB", (4, 4), (1, 2, 3)).save(d / "anim.gif", save_all=True,
                                             append_images=[Image.new("RGB", (4, 4), (200, 0, 0))])
    assert Image.open(d / "sixteen.png").mode.startswith("I")
    ds = build_dataset("imagefolder", tmp_path, "train")
    got = {Path(i).name: np.asarray(ds.load_image(k)) for k, i in enumerate(ds.ids)}
    assert len(got) == 9 and all(a.dtype == np.uint8 and a.shape[2] == 3 for a in got.values())
    assert (got["gray.png"] == 77).all() and (got["bilevel.png"] == 255).all()
    assert got["rgba.png"][0, 0].tolist() == [255, 255, 255] and abs(int(got["rgba.png"][0, 1, 0]) - 127) <= 1
    assert got["rgba.png"][3, 3].tolist() == [10, 200, 30]
    assert (got["la.png"] == 255).all()  # transparent black is composited on white
    assert (got["palette.png"] == [0, 0, 255]).all()
    assert (got["palette_transparent.png"] == 255).all()
    assert got["sixteen.png"][..., 0].tolist() == [[0, 255], [128, 1]]
    assert (got["cmyk.jpg"] > 250).all()  # CMYK (0,0,0,0) is white
    assert got["anim.gif"][0, 0].tolist() == [1, 2, 3]  # first frame


def test_unreadable_folder_is_skipped_with_warning(tmp_path, monkeypatch, caplog):
    make_class_tree(tmp_path / "train", ["a", "b", "c"], 2)
    locked = tmp_path / "train" / "b"
    real = os.scandir

    def scandir(path):  # tests run as root, where chmod 000 does not stop reads
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied")
        return real(path)
    monkeypatch.setattr(images_mod.os, "scandir", scandir)
    with caplog.at_level(logging.WARNING):
        ds = build_dataset("imagefolder", tmp_path, "train")
    assert ds.classes == ["a", "b", "c"] and ds.class_counts().tolist() == [2, 0, 2]
    warns = _warnings(caplog)
    assert any(str(locked) in w and "Permission denied" in w for w in warns)
    # the split folder itself unreadable: one clear error
    def denied(path):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(images_mod.os, "scandir", denied)
    with pytest.raises(MVCError, match="cannot read folder"):
        build_dataset("imagefolder", tmp_path, "train")


def test_special_files_in_class_folders_are_skipped_never_opened(tmp_path, caplog):
    import socket

    make_class_tree(tmp_path / "train", ["a", "b"], 2)
    os.mkfifo(tmp_path / "train" / "a" / "fifo.png")  # opening it for reading would block
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "train" / "b" / "sock.png"))
    try:
        with caplog.at_level(logging.WARNING), no_hang():
            ds = build_dataset("imagefolder", tmp_path, "train")
            assert ds.class_counts().tolist() == [2, 2]
            with pytest.raises(MVCError, match="not a regular file"):
                load_rgb(tmp_path / "train" / "a" / "fifo.png")
    finally:
        sock.close()
    assert any("fifo.png (not a regular file)" in w and "sock.png (not a regular file)" in w
               for w in _warnings(caplog))


def test_empty_classes_and_empty_dataset(tmp_path, caplog):
    make_class_tree(tmp_path / "train", ["a"], 2)
    (tmp_path / "train" / "empty").mkdir()
    with caplog.at_level(logging.WARNING):
        ds = build_dataset("imagefolder", tmp_path, "train")
    assert ds.classes == ["a", "empty"] and ds.class_counts().tolist() == [2, 0]
    assert any("empty" in w and "without usable images" in w for w in _warnings(caplog))

    only_bad = tmp_path / "bad"
    (only_bad / "train" / "a").mkdir(parents=True)
    (only_bad / "train" / "a" / "x.jpg").write_bytes(b"")
    with pytest.raises(MVCError, match="no usable images"):
        build_dataset("imagefolder", only_bad, "train")
    (tmp_path / "none" / "train").mkdir(parents=True)
    with pytest.raises(MVCError, match="no class folders"):
        build_dataset("imagefolder", tmp_path / "none", "train")


def test_unsafe_class_names_kept_and_cannot_escape(tmp_path):
    names = ["a b", "Ünïcode", "x:y;z", "-dash"]
    make_class_tree(tmp_path / "data" / "train", names, 1)
    ds = build_dataset("imagefolder", tmp_path / "data", "train")
    assert ds.classes == sorted(names) and len(ds) == 4
    out = tmp_path / "out"
    for name in ds.classes + ["../../evil", "T-shirt/top", "..", "/etc/passwd"]:
        p = safe_join(out, safe_name(name), "img.png")
        assert out.resolve() in p.parents and "/" not in safe_name(name)
    with pytest.raises(MVCError, match="outside"):
        safe_join(out, "../../evil")
    assert safe_name(sources.FASHION_CLASSES[0]) == "T-shirt_top"


def test_load_rgb_names_missing_file(tmp_path):
    with pytest.raises(MVCError, match="nope.png"):
        load_rgb(tmp_path / "nope.png")


def test_registry_is_the_mvc_registry():
    from mvc.core.registry import Registry

    assert isinstance(DATASETS, Registry) and "fashion_mnist" in DATASETS
