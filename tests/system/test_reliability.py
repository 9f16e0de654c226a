"""Reliability, third round: the file system misbehaving, names that are not UTF-8, precisions a device cannot
do, requests that do no work, empty output settings, synthetic sets of another run, and camera JPEGs.

Each case is one `error:` line and exit code 2 (never a traceback), with nothing lost on disk, or the plain
meaning done. The scripts run in-process through `mvc.core.utils.run_cli`, as `python script.py` runs them; a
full disk is the real file-size limit (RLIMIT_FSIZE) in a subprocess, or the OS write refusing (ENOSPC).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mvc.core.utils import MVCError, read_jsonl, run_cli
from tests.helpers import MICRO, micro_argv, write_fashion_idx

ROOT = Path(__file__).resolve().parents[2]

#################################################################################
#                                  Helpers                                      #
#################################################################################

def _png(path: Path, value: int, size: int = 16) -> None:
    """A small grey PNG with a bright band whose height depends on `value`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size, size, 3), 20, np.uint8)
    arr[2:4 + value % 10, 3:12] = 100 + 15 * (value % 10)
    Image.fromarray(arr).save(path)


def _imagefolder(root: Path, classes: list, per_class: int = 3, test_per_class: int = 1) -> Path:
    """`root/{train,test}/<class>/<i>.png`; a class may be given as bytes (a name that is not UTF-8)."""
    for split, n in (("train", per_class), ("test", test_per_class)):
        for c, name in enumerate(classes):
            folder = os.path.join(os.fsencode(root / split), os.fsencode(name))
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                _png(Path(os.fsdecode(folder)) / f"{i}.png", i + 3 * c)
    return root


def _run(script, argv, capsys) -> tuple[int, str]:
    """Run a script's `cli` in-process through run_cli; (exit code, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(script, argv)
    return e.value.code, capsys.readouterr().err


def _one_error_line(code: int, err: str, *words: str) -> str:
    """Exit 2, no traceback, exactly one `error:` line, the last one, holding `words`; returns it."""
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [ln.strip() for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines[-10:]
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


def _files(root: Path) -> set[str]:
    """Every file and folder under `root` (relative paths)."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")} if root.exists() else set()


#################################################################################
#                     The file system: links that loop                          #
#################################################################################

def test_a_data_scan_skips_links_that_loop(tmp_path, caplog):
    """A class folder linked to its parent, one linked to itself and an image linked to itself are skipped with a
    warning: the classes are the real ones and every real image is indexed (no OSError, no endless walk)."""
    from mvc.data.sources import imagefolder

    root = _imagefolder(tmp_path / "data", ["a", "b"])
    os.symlink("..", root / "train" / "up")        # a class folder pointing at its parent
    os.symlink("me", root / "train" / "me")        # a folder link pointing at itself (ELOOP)
    os.symlink("self.png", root / "train" / "a" / "self.png")  # an image pointing at itself (ELOOP)
    os.symlink("..", root / "test" / "b" / "back")  # a link inside a class folder, back to the split
    train, test = imagefolder(root, "train"), imagefolder(root, "test")
    assert train.classes == ["a", "b"] and len(train) == 6 and len(test) == 2
    text = caplog.text
    assert "loop" in text and "'up'" in text and "'me'" in text and "self.png" in text


def test_predict_on_a_folder_with_links_that_loop_scores_the_real_images(tmp_path):
    from mvc.classifier.predict import list_images

    _png(tmp_path / "imgs" / "a.png", 1)
    os.symlink("..", tmp_path / "imgs" / "up")
    os.symlink("self.png", tmp_path / "imgs" / "self.png")
    assert [p.name for p in list_images(tmp_path / "imgs")] == ["a.png"]


#################################################################################
#                          The file system: a full disk                         #
#################################################################################

_FULL = textwrap.dedent("""
    import resource, sys
    import numpy as np, torch
    from PIL import Image
    from mvc.core.checkpoint import save_checkpoint
    from mvc.core.utils import run_cli
    from mvc.data.synthetic import Job, SyntheticSet, make_record

    where, what = sys.argv[1], sys.argv[2]
    save_checkpoint(where + "/ckpt", 1, {"w": torch.zeros(10)}, {})  # an earlier checkpoint, which must survive
    out = SyntheticSet(where + "/set")
    out.prepare({"seed": 0}, ["a"])
    job = Job(0, 0, "a", "000_a", 0, "x", 0, "coarse")
    out.save_image(Image.new("RGB", (8, 8)), job)
    out.append(0, make_record(job))
    resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))  # what one process may write to one file

    def main(argv):
        if what == "checkpoint":  # torch's zip writer: 'unexpected pos' or 'file write failed'
            save_checkpoint(where + "/ckpt", 2, {"w": torch.zeros(100_000)}, {})
        elif what == "image":  # PIL: EFBIG
            big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8))
            out.save_image(big, Job(1, 0, "a", "000_a", 0, "x", 1, "coarse"))
        else:  # the records: EFBIG part-way through a line
            for v in range(2, 2000):
                out.append(0, make_record(Job(v, 0, "a", "000_a", 0, "x", v, "coarse"), pad="x" * 100))

    run_cli(main)
""")


@pytest.mark.parametrize("what", ["checkpoint", "image", "records"])
def test_a_full_disk_is_one_line_naming_the_file_and_keeps_what_was_written(what, tmp_path):
    """The real file-size limit, in a subprocess: one line naming the file and what to free, exit 2; no temporary
    file is left, the earlier checkpoint and image are intact, and the records file ends on a complete line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _FULL, str(tmp_path), what], env=env, capture_output=True,
                          text=True, timeout=240)
    line = _one_error_line(proc.returncode, proc.stderr, "cannot write", "free space")
    name = {"checkpoint": "checkpoint-00000002.pt", "image": "00000_v001.png", "records": "metadata.rank0.jsonl"}
    assert name[what] in line
    left = _files(tmp_path)
    assert not [f for f in left if ".tmp-" in f], left
    assert "ckpt/checkpoint-00000002.pt" not in left and "set/000_a/00000_v001.png" not in left
    from mvc.core.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "ckpt" / "checkpoint-00000001.pt")["step"] == 1
    Image.open(tmp_path / "set" / "000_a" / "00000_v000.png").load()
    raw = (tmp_path / "set" / "metadata.rank0.jsonl").read_bytes()
    assert raw.endswith(b"\n") and all(json.loads(line) for line in raw.splitlines())


def test_no_space_left_while_saving_a_checkpoint_is_one_line(tmp_path, monkeypatch, capsys):
    """ENOSPC from the OS write under torch.save (part of the file written, then the refusal): one line naming
    the checkpoint, the earlier checkpoints kept, no temporary file left."""
    from mvc.core import checkpoint as ck

    ck.save_checkpoint(tmp_path, 1, {"w": torch.zeros(4)}, {})
    real_save = torch.save

    def full(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:
            fh.truncate(100)  # what reached the disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    code, err = _run(lambda argv: ck.save_checkpoint(tmp_path, 2, {"w": torch.zeros(4)}, {}), [], capsys)
    _one_error_line(code, err, "checkpoint-00000002.pt", "full", "free space")
    assert sorted(_files(tmp_path)) == ["checkpoint-00000001.pt"]


def test_no_space_left_while_appending_records_cuts_back_to_whole_lines(tmp_path, monkeypatch):
    """ENOSPC part-way through an append (the OS took half the bytes): the file is cut back to the lines it held."""
    from mvc.core import utils

    utils.append_jsonl(tmp_path / "m.jsonl", {"i": 0})
    real_write = os.write

    def half(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(utils.os, "write", half)
    with pytest.raises(MVCError, match="m.jsonl.*full"):
        utils.append_jsonl(tmp_path / "m.jsonl", {"i": 1}, {"i": 2})
    monkeypatch.undo()
    assert read_jsonl(tmp_path / "m.jsonl") == [{"i": 0}]
    assert (tmp_path / "m.jsonl").read_bytes() == b'{"i": 0}\n'


#################################################################################
#                        Images as cameras write them                           #
#################################################################################

def _rotated_jpeg(path: Path) -> np.ndarray:
    """A 24x12 (w x h) JPEG whose EXIF says "turn 90 degrees clockwise to show" (orientation 6); returns the
    upright pixels (12x24 when shown) that a viewer displays."""
    arr = np.zeros((12, 24, 3), np.uint8)
    arr[:, :8] = (250, 10, 10)  # the stored left third red
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, exif=exif, quality=95)
    return np.asarray(im.transpose(Image.Transpose.ROTATE_270))


def test_exif_orientation_is_applied_by_the_one_loader_of_every_stage(tmp_path):
    """The dataset (training and generation read it), `predict`'s file list and a PIL image handed to a model all
    see the image upright, as a viewer shows it."""
    from mvc.data.images import load_rgb, to_rgb
    from mvc.data.sources import imagefolder

    upright = _rotated_jpeg(tmp_path / "data" / "train" / "a" / "cam.jpg")
    _rotated_jpeg(tmp_path / "data" / "test" / "a" / "cam.jpg")
    assert upright.shape == (24, 12, 3)
    ds = imagefolder(tmp_path / "data", "train")
    for im in (ds.load_image(0), load_rgb(tmp_path / "data" / "train" / "a" / "cam.jpg"),
               to_rgb(Image.open(tmp_path / "data" / "train" / "a" / "cam.jpg"))):
        arr = np.asarray(im).astype(int)
        assert arr.shape == upright.shape
        assert np.abs(arr - upright).mean() < 8  # JPEG noise only
        assert arr[:8, :, 0].mean() > 200 and arr[-8:, :, 0].mean() < 60  # the red third now on top


#################################################################################
#                     A precision the device cannot do                          #
#################################################################################


@pytest.mark.parametrize("device", ["cpu", "cuda", "mps"])
@pytest.mark.parametrize("precision", ["no", "fp32", "fp16", "bf16"])
@pytest.mark.parametrize("has_bf16", [True, False])
def test_every_precision_on_every_device_is_allowed_or_refused_by_one_table(precision, device, has_bf16):
    from mvc.core.distributed import precision_problem

    problem = precision_problem(precision, device, has_bf16)
    refused = (precision == "fp16" and device == "cpu") or (precision == "bf16" and not has_bf16)
    assert (problem is not None) == refused, (precision, device, has_bf16, problem)
    if refused:
        assert precision in problem and "use" in problem  # what to choose instead


def test_the_device_here_is_asked_not_assumed():
    from mvc.core.distributed import bf16_supported, check_precision

    assert bf16_supported("cpu")
    check_precision("bf16", "cpu", "k")
    check_precision("no", "cpu", "k")
    with pytest.raises(MVCError, match="k 'fp16' cannot run on cpu"):
        check_precision("fp16", "cpu", "k")
    if torch.cuda.is_available():  # a GPU answers for itself
        assert bf16_supported("cuda") == torch.cuda.is_bf16_supported()
        check_precision("fp16", "cuda", "k")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_fashion_idx(tmp_path_factory.mktemp("reliab_data"))


def _scripts():
    import evaluate_synthetic
    import generate_mvc
    import run_pipeline
    import train_classifier
    import train_mvc

    return {"train_mvc": train_mvc.cli, "generate_mvc": generate_mvc.cli, "train_classifier": train_classifier.cli,
            "evaluate_synthetic": evaluate_synthetic.cli, "run_pipeline": run_pipeline.cli}


PRECISION_CASES = [  # (script, flags, environment (accelerate launch's setting), words)
    ("train_mvc", ["--train.mixed_precision=fp16"], {}, ["train.mixed_precision 'fp16'", "cpu", "bf16"]),
    ("train_classifier", ["--classifier.mixed_precision=fp16"], {}, ["classifier.mixed_precision 'fp16'"]),
    ("evaluate_synthetic", ["--classifier.mixed_precision=fp16"], {}, ["classifier.mixed_precision 'fp16'"]),
    ("generate_mvc", ["--generate.dtype=fp16"], {}, ["generate.dtype 'fp16'"]),
    ("generate_mvc", ["--generate.method=dreambooth"], {"ACCELERATE_MIXED_PRECISION": "fp16"},
     ["accelerate's mixed precision", "'fp16'"]),
    ("generate_mvc", ["--generate.method=textual_inversion"], {"ACCELERATE_MIXED_PRECISION": "fp16"},
     ["accelerate's mixed precision", "'fp16'"]),
    ("train_mvc", [], {"ACCELERATE_MIXED_PRECISION": "fp16"}, ["accelerate's mixed precision"]),
    ("run_pipeline", ["--classifier.mixed_precision=fp16"], {}, ["classifier.mixed_precision 'fp16'"]),
    ("run_pipeline", ["--generate.dtype=fp16"], {}, ["generate.dtype 'fp16'"]),
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's refusals (a GPU computes in fp16)")
@pytest.mark.parametrize("case", PRECISION_CASES, ids=[f"{c[0]}-{c[1][:1]}-{sorted(c[2])}" for c in PRECISION_CASES])
def test_a_precision_the_cpu_lacks_is_refused_by_every_stage_before_work(case, data, tmp_path, capsys, monkeypatch,
                                                                          fresh_accelerate):
    """fp16 on the CPU, set in the config or by accelerate's launcher: one line naming the setting, before the run
    folder gets anything (no config file, no tiny base, no checkpoint)."""
    script, flags, environ, words = case
    for k, v in environ.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "run"
    code, err = _run(_scripts()[script], micro_argv(data, out, tmp_path / "cache", *flags), capsys)
    _one_error_line(code, err, *words)
    assert _files(out) == set() and _files(tmp_path / "cache") == set()


#################################################################################
#                 Work that means nothing, empty output settings                #
#################################################################################

@pytest.fixture(scope="module")
def classifier_ckpt(data, tmp_path_factory):
    """A classifier checkpoint made by train_classifier.py itself (one micro epoch)."""
    import train_classifier

    out = tmp_path_factory.mktemp("reliab_clf")
    run_cli(train_classifier.cli, micro_argv(data, out, out / "cache", "--classifier.epochs=1", "--strategy", "real"))
    return next((out / "classifier").glob("real-*/checkpoints/checkpoint-*.pt"))


def test_predict_on_a_folder_without_images_is_refused(classifier_ckpt, tmp_path, capsys):
    import train_classifier

    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no image here")
    code, err = _run(train_classifier.cli, ["predict", "--checkpoint", str(classifier_ckpt), "--images",
                                            str(tmp_path / "empty"), "--out", str(tmp_path / "p.jsonl")], capsys)
    _one_error_line(code, err, "no images under", "empty")
    assert not (tmp_path / "p.jsonl").exists()


def test_a_classifier_told_to_stop_after_zero_epochs_is_refused(data, tmp_path, capsys):
    import train_classifier

    out = tmp_path / "run"
    code, err = _run(train_classifier.cli, micro_argv(data, out, tmp_path / "cache", "--stop-after", "0"), capsys)
    _one_error_line(code, err, "--stop-after", "at least 1")
    assert _files(out) == set()


def test_generation_that_plans_no_image_is_refused_before_any_model(data, tmp_path, capsys):
    """generate.multiplier 0 (or one that rounds to 0 per class): one line, no tiny base built, no set folder."""
    import generate_mvc

    out = tmp_path / "run"
    # 0 is refused with the config, before any stage (so also by run_pipeline.py before fine-tuning); 0.1 with
    # 2 labelled images per class rounds to 0 images: refused when the plan is made, before any model
    for m, says in (("0", "generate.multiplier"), ("0.1", "no synthetic image")):
        code, err = _run(generate_mvc.cli, micro_argv(data, out, tmp_path / "cache", f"--generate.multiplier={m}",
                                                   "--generate.method=img2img", "--generate.per_class=null"),
                         capsys)
        _one_error_line(code, err, says)
    assert not (out / "synthetic_img2img").exists() and _files(tmp_path / "cache") == set()


def test_a_pipeline_told_to_make_no_synthetic_image_is_refused_before_fine_tuning(data, tmp_path, capsys):
    """generate.multiplier=0 in run_pipeline.py: one line before the first stage (nothing written)."""
    import run_pipeline

    out = tmp_path / "run"
    code, err = _run(run_pipeline.cli, micro_argv(data, out, tmp_path / "cache", "--generate.multiplier=0",
                                                  "--generate.per_class=null"), capsys)
    _one_error_line(code, err, "generate.multiplier")
    assert _files(out) == set() and _files(tmp_path / "cache") == set()


@pytest.mark.parametrize("key", ["run.output_dir", "tiny.cache_dir", "evaluate.cache_dir"])
def test_an_empty_output_setting_in_a_config_file_is_refused(key, data, tmp_path, capsys, monkeypatch):
    """An empty value in YAML (the command line already refuses one) would be the current folder: refused, and the
    current folder stays empty."""
    import yaml

    import train_classifier

    section, name = key.split(".")
    tree = yaml.safe_load(MICRO.read_text())
    tree.setdefault(section, {})[name] = ""
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(tree))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    argv = ["--config", str(cfg_file), f"--data.root={data}"]
    argv += [f"--{k}={tmp_path / k}" for k in ("run.output_dir", "tiny.cache_dir", "evaluate.cache_dir") if k != key]
    code, err = _run(train_classifier.cli, argv, capsys)
    _one_error_line(code, err, key, "empty")
    assert _files(cwd) == set()


#################################################################################
#                       Names and bytes that are not UTF-8                      #
#################################################################################

def test_a_class_folder_named_in_latin1_is_shown_escaped_and_used_safely(tmp_path, capsys):
    """b"caf\\xe9" (Latin-1): the dataset reads its images from the real folder and names the class `caf\\xe9`
    everywhere (no surrogate reaches a tokenizer, a font, JSON or a report); a classifier run on it writes its
    figure and metrics, and `predict` prints a Latin-1 file name escaped."""
    import train_classifier
    from mvc.data.sources import imagefolder

    root = _imagefolder(tmp_path / "data", ["apple", b"caf\xe9"], per_class=4, test_per_class=2)
    ds = imagefolder(root, "train")
    assert ds.classes == ["apple", "caf\\xe9"] and len(ds) == 8 and sorted(ds.targets.tolist()) == [0] * 4 + [1] * 4
    for c in ds.classes:
        c.encode("utf-8")  # no surrogate left
    assert np.asarray(ds.load_image(int(np.flatnonzero(ds.targets == 1)[0]))).shape == (16, 16, 3)
    from mvc.data.prompts import make_prompt
    from mvc.diffusion.tokenizer import build_tiny_tokenizer

    prompt = make_prompt("{caption}, {label}", "a photo", ds.classes[1])
    build_tiny_tokenizer(ds.classes)([prompt], padding="max_length", truncation=True)  # the tokenizer takes it
    out = tmp_path / "run"
    argv = micro_argv(root, out, tmp_path / "cache", "--data.name=imagefolder", "--data.k_per_class=4",
                      "--classifier.epochs=1", "--classifier.batch_size=4", "--strategy", "real")
    run_cli(train_classifier.cli, argv)
    run = next((out / "classifier").glob("real-*"))
    assert json.loads((run / "metrics.json").read_text())["last"]["accuracy"] >= 0
    assert list(run.rglob("*.png"))  # the confusion-matrix figure was drawn
    imgs = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path / "imgs"), b"\xe9t\xe9.png")))
    _png(imgs, 1)
    capsys.readouterr()
    run_cli(train_classifier.cli, ["predict", "--checkpoint", str(run), "--images", str(imgs.parent)])
    printed = capsys.readouterr().out.strip().split("\t")
    assert printed[0].endswith("\\xe9t\\xe9.png") and printed[1] in ("apple", "caf\\xe9")


#################################################################################
#                  A synthetic set that does not belong to the run              #
#################################################################################

def _write_set(root: Path, labelled, data_fp: str) -> Path:
    """A synthetic set in the project's format (settings file, marked PNGs, records) recording `data_fp`."""
    from mvc.data.synthetic import SyntheticSet, make_record, plan_jobs

    out = SyntheticSet(root)
    out.prepare({"method": "img2img", "data": data_fp, "classes": list(labelled.classes), "seed": 0}, labelled.classes)
    jobs = plan_jobs(labelled, ["coarse"], per_class=1)
    for j in jobs:
        out.save_image(labelled.load_image(j.source), j)
        out.append(0, make_record(j))
    out.reconcile(jobs)
    return root


@pytest.mark.parametrize("script", ["train_classifier", "evaluate_synthetic"])
def test_a_synthetic_set_of_another_labelled_subset_or_real_images_is_refused(script, data, tmp_path, capsys):
    """A set generated from data.subset_seed=0's subset, read by a run on subset_seed=1: one line naming the
    labelled subset; a folder of real images inside data.root: one line; the run's own set passes the check."""
    from mvc.core.config import load_yaml, make_config
    from mvc.data import load_splits
    from mvc.data.synthetic import check_provenance

    cfg = make_config(load_yaml(MICRO))
    cfg.data.root = str(data)
    labelled = load_splits(cfg.data)[0]
    ours = _write_set(tmp_path / "set", labelled, labelled.fingerprint())
    check_provenance(ours, labelled, data)  # its own run: accepted
    extra = ["--strategy", "probabilistic"] if script == "train_classifier" else []
    flag = "--classifier.synthetic_dir" if script == "train_classifier" else "--set"
    out = tmp_path / "run"
    argv = micro_argv(data, out, tmp_path / "cache", "--data.subset_seed=1", *extra, f"{flag}={ours}")
    code, err = _run(_scripts()[script], argv, capsys)
    _one_error_line(code, err, "labelled subset", "data.subset_seed", str(ours))
    real = _write_set(data / "copies", labelled, labelled.fingerprint())  # real images, inside data.root
    try:
        argv = micro_argv(data, out, tmp_path / "cache", *extra, f"{flag}={real}")
        code, err = _run(_scripts()[script], argv, capsys)
        _one_error_line(code, err, "inside data.root", "real images")
    finally:
        import shutil

        shutil.rmtree(real)
