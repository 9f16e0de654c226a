"""Bad input to every user-facing script: one `error:` line on stderr, exit code 2, never a traceback.

Scripts: train_mvc.py, generate_mvc.py, train_classifier.py (and its `predict` subcommand),
run_pipeline.py, scripts/ablate_mixing.py. Each case runs the script's `main` through
`mvc.core.utils.run_cli` in-process (as `python script.py ...` does, minus the interpreter start-up);
`test_cli_subprocesses_print_no_traceback` runs three of them as real processes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path, PurePosixPath
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate_synthetic
import generate_mvc
import run_pipeline
import train_classifier
import train_mvc
from mvc.core.utils import run_cli
from tests.helpers import MICRO, micro_argv, no_hang, write_fashion_idx, write_random_ip2p

ROOT = Path(__file__).resolve().parents[2]


def _load_script(path: Path):
    """Import a script that is not a module on sys.path (scripts/ablate_mixing.py)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ablate_mixing = _load_script(ROOT / "scripts" / "ablate_mixing.py")

SCRIPTS = {
    "train_mvc": train_mvc.cli,
    "generate_mvc": generate_mvc.cli,
    "train_classifier": train_classifier.cli,
    "predict": lambda argv: train_classifier.cli(["predict", *argv]),
    "run_pipeline": run_pipeline.cli,
    "ablate_mixing": ablate_mixing.cli,
    "evaluate_synthetic": evaluate_synthetic.cli,
}
CONFIG_SCRIPTS = ["train_mvc", "generate_mvc", "train_classifier", "run_pipeline", "ablate_mixing"]


#################################################################################
#                                 Fixtures                                      #
#################################################################################

def _png(path: Path, value: int, size: int = 16) -> None:
    """A small grey PNG with a bright square whose size depends on `value`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size, size, 3), 20, np.uint8)
    arr[2:4 + value % 10, 3:12] = 100 + 15 * (value % 10)
    Image.fromarray(arr).save(path)


def _imagefolder(root: Path, train: dict[str, int], test: dict[str, int] | None = None) -> Path:
    """`root/{train,test}/<class>/<i>.png` with the given image counts (0: an empty class folder)."""
    for split, counts in (("train", train), ("test", test or {c: 1 for c in train})):
        for c, n in counts.items():
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _png(root / split / c / f"{i}.png", i + 3 * len(c))
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory, one_thread):
    """Data roots (good, and each kind of bad), an IP2P model folder, a classifier checkpoint."""
    base = tmp_path_factory.mktemp("bad_input")
    good = write_fashion_idx(base / "fmnist")
    single = _imagefolder(base / "single", {"a": 3, "b": 1})
    empty = _imagefolder(base / "empty", {"a": 0, "b": 0})
    zero = _imagefolder(base / "zero", {"a": 0, "b": 0})
    for c in ("a", "b"):
        for i in range(2):
            (zero / "train" / c / f"{i}.png").write_bytes(b"")
    trunc = _imagefolder(base / "trunc", {"a": 3, "b": 3})
    src = base / "src.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(src)
    (trunc / "train" / "a" / "cut.jpg").write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    folder = base / "folder"  # images to score with `predict`: one good, one empty file, one cut JPEG
    _png(folder / "ok.png", 1)
    zero_img = base / "zero_img"
    _png(zero_img / "ok.png", 1)
    (zero_img / "empty.png").write_bytes(b"")
    cut_img = base / "cut_img"
    _png(cut_img / "ok.png", 1)
    (cut_img / "cut.jpg").write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    not_ckpt = base / "not_a_checkpoint.pt"
    not_ckpt.write_text("hello")
    unsafe = base / "unsafe.pt"  # a pickle of an object that weights_only refuses (harmless if it were loaded)
    torch.save({"format_version": 1, "x": PurePosixPath("x")}, unsafe)
    scalar_section = base / "scalar_section.yaml"
    scalar_section.write_text("train: fast\n")
    latin1 = base / "latin1.yaml"
    latin1.write_bytes(b"run:\n  output_dir: caf\xe9\n")
    a_file = base / "a_file"
    a_file.write_text("not a folder")

    # a random InstructPix2Pix folder shaped like the micro base (what train_mvc.py writes)
    from mvc.core.config import load_yaml, make_config

    model = write_random_ip2p(base / "model", make_config(load_yaml(MICRO)).tiny)
    # a classifier checkpoint, made by train_classifier.py itself (one micro epoch)
    clf_out = base / "clf"
    run_cli(train_classifier.cli, micro_argv(good, clf_out, clf_out / "cache", "--classifier.epochs=1",
                                              "--strategy", "real"))
    ckpt = next((clf_out / "classifier").glob("real-*/checkpoints/checkpoint-*.pt"))
    yield SimpleNamespace(base=base, good=good, single=single, empty=empty, zero=zero, trunc=trunc, folder=folder,
                          zero_img=zero_img, cut_img=cut_img, not_ckpt=not_ckpt, model=model, ckpt=ckpt,
                          nowhere=base / "does_not_exist", unsafe=unsafe, scalar_section=scalar_section,
                          latin1=latin1, a_file=a_file)


def _fill(env, arg: str) -> str:
    """Replace `{name}` by the fixture path `env.name` (other braces, e.g. a prompt template's, stay)."""
    for k, v in vars(env).items():
        arg = arg.replace("{" + k + "}", str(v))
    return arg


def _argv(env, out: Path, script: str, args: list[str]) -> list[str]:
    """Micro-profile arguments on the good fixture data (cases override data.*) plus the case's own."""
    args = [_fill(env, a) for a in args]
    if script == "predict":  # its own flags only
        return args
    return micro_argv(env.good, out, out / "cache", *args)


def _run(script: str, argv: list[str], capsys) -> tuple[int, str]:
    """Run one script in-process through run_cli; (exit code, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(SCRIPTS[script], argv)
    return e.value.code, capsys.readouterr().err


def _assert_one_error_line(code: int, err: str, words: list[str], alone: bool) -> None:
    """Exit 2, no traceback, exactly one `error:` line (the last line; the only one when `alone`)."""
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [ln.strip() for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines[-10:]
    if alone:
        assert lines == errors, lines
    for w in words:
        assert w in errors[0], (w, errors[0])


#################################################################################
#                       Config and flags: every script                          #
#################################################################################

# (id, args, words in the message); these fail while parsing, before any work, in every script
CONFIG_CASES = [
    ("missing-config", ["--config", "{nowhere}/c.yaml"], ["config file not found", "c.yaml"]),
    ("unknown-key", ["--train.nope=1"], ["unknown config key", "train.nope"]),
    ("unknown-section", ["--nosuch.key=1"], ["unknown config key", "nosuch.key"]),
    ("unknown-option", ["--bogus"], ["unknown option --bogus"]),
    ("wrong-type", ["--run.seed=abc"], ["run.seed", "expected"]),
    ("wrong-type-list", ["--mixing.ops=coarse"], ["mixing.ops", "expected"]),
    ("unknown-dataset", ["--data.name=nosuch"], ["data.name", "nosuch", "fashion_mnist"]),
    ("unknown-captioner", ["--captions.captioner=nosuch"], ["captions.captioner", "attributes"]),
    ("unknown-strategy", ["--classifier.strategy=nosuch"], ["classifier.strategy", "probabilistic"]),
    ("guidance-zero", ["--generate.guidance_scale=0"], ["generate.guidance_scale", "> 0"]),
    ("image-guidance-negative", ["--generate.image_guidance_scale=-1"], ["generate.image_guidance_scale"]),
    ("negative-k", ["--mixing.coarse_k=0"], ["mixing.coarse_k", ">= 1"]),
    ("dropout-sum", ["--train.drop_text_prob=0.5", "--train.drop_image_prob=0.4", "--train.drop_both_prob=0.2"],
     ["train.drop_both_prob", "1.100 > 1"]),
    # values that used to slip past validation (nan passes every range) or reach torch as a traceback
    ("nan-float", ["--train.max_grad_norm=nan"], ["train.max_grad_norm", "not a finite number"]),
    ("inf-count", ["--generate.multiplier=.inf"], ["generate.multiplier", "not a finite number"]),
    ("adam-beta-one", ["--train.adam_beta2=1"], ["train.adam_beta2", "< 1"]),
    ("seed-huge", ["--run.seed=99999999999999999999"], ["run.seed", "out of range"]),
    ("seed-negative", ["--classifier.seeds=[-1]"], ["classifier.seeds", ">= 0"]),
    ("empty-seeds", ["--pipeline.seeds=[]"], ["pipeline.seeds", "at least 1"]),
    ("empty-widths", ["--tiny.unet_channels=[]"], ["tiny.unet_channels", "at least 1"]),
    ("odd-widths", ["--tiny.unet_channels=[16,24]"], ["tiny.unet_channels", "multiples of 16"]),
    ("template-spec", ["--captions.prompt_template={caption:>10}, {label}"], ["captions.prompt_template", "spec"]),
    ("section-scalar", ["--config", "{scalar_section}"], ["config section train", "'fast'"]),
    ("config-not-utf8", ["--config", "{latin1}"], ["not UTF-8"]),
]


@pytest.mark.parametrize("script", CONFIG_SCRIPTS)
@pytest.mark.parametrize("case", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_errors_are_one_line_in_every_script(script, case, env, tmp_path, capsys):
    _, args, words = case
    code, err = _run(script, _argv(env, tmp_path / "out", script, args), capsys)
    _assert_one_error_line(code, err, words, alone=True)
    assert not (tmp_path / "out").exists(), "a config error must stop the script before it writes anything"


#################################################################################
#                         Data, models, checkpoints                             #
#################################################################################

MISSING_ROOT = ["--data.name=imagefolder", "--data.root={nowhere}"]
EMPTY = ["--data.name=imagefolder", "--data.root={empty}"]
ZERO = ["--data.name=imagefolder", "--data.root={zero}"]
SINGLE = ["--data.name=imagefolder", "--data.root={single}"]
TRUNC = ["--data.name=imagefolder", "--data.root={trunc}", "--data.k_per_class=null"]
NO_LABEL = ["--captions.prompt_template={caption}, a photo"]
MODEL = ["--generate.model_dir={model}"]
ABLATE_FEW = ["--seeds", "0", "--m", "2", "--stages", "tokens", "--modes", "shuffle", "--windows", "caption"]

# (id, script, args, words in the message)
CASES = [
    # train_mvc.py
    ("train-missing-root", "train_mvc", MISSING_ROOT, ["folder not found", "does_not_exist"]),
    ("train-empty-dataset", "train_mvc", EMPTY, ["no usable images"]),
    ("train-zero-byte-images", "train_mvc", ZERO, ["no usable images"]),
    ("train-single-image-class", "train_mvc", SINGLE, ["fewer than 2 images", "'b'"]),
    ("train-truncated-image", "train_mvc", TRUNC, ["cannot read image", "cut.jpg"]),
    ("train-template-without-label", "train_mvc", NO_LABEL, ["{label}"]),
    ("train-missing-base", "train_mvc", ["--model.base={nowhere}/sd"], ["model.base", "does_not_exist"]),
    ("train-data-root-is-a-file", "train_mvc", ["--data.root={a_file}"], ["data.root", "is a file"]),
    ("train-resume-latest-none", "train_mvc", ["--model.base={model}", "--resume", "latest"], ["no checkpoint"]),
    # checked before any data or model loading: the missing checkpoint is reported, not the missing data
    ("train-resume-checked-first", "train_mvc", MISSING_ROOT + ["--model.base={nowhere}/sd", "--resume", "latest"],
     ["no checkpoint"]),
    ("train-resume-missing-file", "train_mvc", ["--model.base={model}", "--resume", "{nowhere}/c.pt"],
     ["no checkpoint file", "c.pt"]),
    ("train-resume-not-a-checkpoint", "train_mvc", ["--model.base={model}", "--resume", "{not_ckpt}"],
     ["cannot read checkpoint", "not_a_checkpoint.pt"]),
    # generate_mvc.py
    ("gen-missing-model", "generate_mvc", ["--generate.model_dir={nowhere}/final"], ["no fine-tuned pipeline"]),
    ("gen-missing-root", "generate_mvc", MODEL + MISSING_ROOT, ["folder not found"]),
    ("gen-empty-dataset", "generate_mvc", MODEL + EMPTY, ["no usable images"]),
    ("gen-zero-byte-images", "generate_mvc", MODEL + ZERO, ["no usable images"]),
    ("gen-truncated-image", "generate_mvc", MODEL + TRUNC, ["cannot read image", "cut.jpg"]),
    ("gen-single-image-class", "generate_mvc", MODEL + SINGLE, ["one labelled image", "'b'"]),
    ("gen-unknown-op", "generate_mvc", MODEL + ["--mixing.ops=[blend]"], ["blend"]),
    ("gen-template-without-label", "generate_mvc", MODEL + NO_LABEL, ["{label}"]),
    # checked before any data or model loading: the template is reported, not the missing data and model
    ("gen-template-checked-first", "generate_mvc", ["--generate.model_dir={nowhere}/final"] + MISSING_ROOT + NO_LABEL,
     ["{label}"]),
    ("gen-k-larger-than-window", "generate_mvc", MODEL + ["--mixing.window=[1,3]", "--mixing.coarse_k=5"],
     ["k=5", "window"]),
    ("gen-m-larger-than-window", "generate_mvc", MODEL + ["--mixing.ops=[fine]", "--mixing.window=[1,3]", "--mixing.fine_m=3"],
     ["m=3", "window"]),
    ("gen-k-larger-than-embedding", "generate_mvc", MODEL + ["--mixing.coarse_k=500"], ["k=500"]),
    ("gen-s-larger-than-width", "generate_mvc", MODEL + ["--mixing.ops=[fine]", "--mixing.fine_s=17"], ["s=17", "16"]),
    ("gen-window-outside", "generate_mvc", MODEL + ["--mixing.window=[0,99]"], ["mixing.window"]),
    ("gen-missing-filter", "generate_mvc", MODEL + ["--generate.filter_checkpoint={nowhere}/f.pt"],
     ["f.pt"]),
    # train_classifier.py
    ("clf-missing-root", "train_classifier", MISSING_ROOT, ["folder not found"]),
    ("clf-empty-dataset", "train_classifier", EMPTY, ["no usable images"]),
    ("clf-zero-byte-images", "train_classifier", ZERO, ["no usable images"]),
    ("clf-truncated-image", "train_classifier", TRUNC, ["cannot read image", "cut.jpg"]),
    ("clf-unknown-backbone", "train_classifier", ["--classifier.backbone=resnet_nope"], ["resnet_nope"]),
    ("clf-strategy-flag", "train_classifier", ["--strategy", "nosuch"], ["--strategy", "nosuch"]),
    ("clf-seeds-type", "train_classifier", ["--seeds", "x"], ["--seeds", "'x'"]),
    ("clf-no-synthetic", "train_classifier", ["--strategy", "concat", "--classifier.synthetic_dir={nowhere}"],
     ["needs synthetic images"]),
    ("clf-resume-latest-none", "train_classifier", ["--resume", "latest"], ["no checkpoint"]),
    ("clf-resume-missing-file", "train_classifier", ["--resume", "{nowhere}/c.pt"], ["c.pt"]),
    ("clf-resume-checked-first", "train_classifier", MISSING_ROOT + ["--resume", "latest"], ["no checkpoint"]),
    # train_classifier.py predict
    ("predict-no-args", "predict", [], ["--checkpoint"]),
    ("predict-missing-checkpoint", "predict", ["--checkpoint", "{nowhere}/c.pt", "--images", "{folder}"],
     ["checkpoint not found"]),
    ("predict-not-a-checkpoint", "predict", ["--checkpoint", "{not_ckpt}", "--images", "{folder}"],
     ["cannot read checkpoint"]),
    ("predict-missing-images", "predict", ["--checkpoint", "{ckpt}", "--images", "{nowhere}"],
     ["image folder not found"]),
    ("predict-zero-byte-image", "predict", ["--checkpoint", "{ckpt}", "--images", "{zero_img}"],
     ["cannot read image", "empty.png"]),
    ("predict-truncated-image", "predict", ["--checkpoint", "{ckpt}", "--images", "{cut_img}"],
     ["cannot read image", "cut.jpg"]),
    ("predict-batch-type", "predict", ["--checkpoint", "{ckpt}", "--images", "{folder}", "--batch-size", "x"],
     ["--batch-size"]),
    ("predict-unsafe-pickle", "predict", ["--checkpoint", "{unsafe}", "--images", "{folder}"],
     ["not a file torch can load safely", "not unpickled"]),
    ("predict-batch-zero", "predict", ["--checkpoint", "{ckpt}", "--images", "{folder}", "--batch-size", "0"], [">= 1"]),
    ("predict-out-is-a-folder", "predict", ["--checkpoint", "{ckpt}", "--images", "{folder}", "--out", "{folder}"],
     ["it is a folder"]),
    ("predict-out-under-a-file", "predict", ["--checkpoint", "{ckpt}", "--images", "{folder}", "--out",
                                             "{a_file}/p.jsonl"], ["a file is in the way"]),
    # run_pipeline.py (each stage's own check, reached through the driver; or the driver's, before any work)
    ("pipe-missing-root", "run_pipeline", MISSING_ROOT, ["folder not found"]),
    ("pipe-empty-dataset", "run_pipeline", EMPTY, ["no usable images"]),
    ("pipe-single-image-class", "run_pipeline", SINGLE, ["fewer than 2 images"]),
    ("pipe-template-without-label", "run_pipeline", NO_LABEL, ["{label}"]),
    ("pipe-unknown-run-strategy", "run_pipeline", ["--pipeline.runs=[nosuch]"], ["nosuch"]),
    ("pipe-unknown-run-augment", "run_pipeline", ["--pipeline.runs=[real+nosuch]"], ["nosuch"]),
    # scripts/ablate_mixing.py
    ("ablate-missing-model", "ablate_mixing", ["--generate.model_dir={nowhere}/final"], ["no fine-tuned pipeline"]),
    ("ablate-k-type", "ablate_mixing", MODEL + ["--k", "x"], ["--k", "'x'"]),
    ("ablate-k-zero", "ablate_mixing", MODEL + ["--k", "0"], [">= 1"]),
    # (one seed and the fewest settings before the bad one: the sweep generates every earlier setting's set first)
    ("ablate-k-larger-than-window", "ablate_mixing", MODEL + ["--mixing.window=[1,3]", "--k", "5", "--s", "1"]
     + ABLATE_FEW, ["k=5", "window"]),
    ("ablate-s-larger-than-width", "ablate_mixing", MODEL + ["--k", "1", "--s", "17"] + ABLATE_FEW, ["s=17"]),
    ("ablate-template-without-label", "ablate_mixing", MODEL + NO_LABEL, ["{label}"]),
    ("ablate-missing-root", "ablate_mixing", MODEL + MISSING_ROOT, ["folder not found"]),
    # output options that would leave the run folder
    ("ablate-out-leaves", "ablate_mixing", MODEL + ["--out", "../elsewhere"], ["--out", "leaves run.output_dir"]),
    ("eval-name-leaves", "evaluate_synthetic", ["--name", "../../elsewhere"], ["--name", "leaves"]),
    ("pipe-report-leaves", "run_pipeline", ["--pipeline.report=../r.md"], ["pipeline.report", "leaves"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line(case, env, tmp_path, capsys):
    _, script, args, words = case
    code, err = _run(script, _argv(env, tmp_path / "out", script, args), capsys)
    _assert_one_error_line(code, err, words, alone=False)
    if case[0].startswith("pipe-unknown-run"):  # found before the first stage, not after fine-tuning
        assert not (tmp_path / "out" / "mvc").exists()


@pytest.mark.parametrize("script", CONFIG_SCRIPTS)
def test_an_output_folder_that_cannot_be_one_is_refused_in_every_script(script, env, tmp_path, capsys):
    before = sorted(p.name for p in env.good.rglob("*"))
    for args, words in ((["--run.output_dir={a_file}"], ["run.output_dir", "is a file"]),
                        (["--run.output_dir={a_file}/sub"], ["cannot create run.output_dir"]),
                        (["--run.output_dir={good}/run"], ["run.output_dir", "inside data.root"]),
                        (["--generate.out_dir={good}/syn"], ["generate.out_dir", "inside data.root"]),
                        (["--generate.grid_dir=synthetic/grids"], ["generate.grid_dir", "inside the synthetic set"])):
        code, err = _run(script, _argv(env, tmp_path / "out", script, args), capsys)
        _assert_one_error_line(code, err, words, alone=False)
    assert sorted(p.name for p in env.good.rglob("*")) == before and env.a_file.read_text() == "not a folder"


def test_resume_refuses_another_kind_or_other_data_in_one_line(env, tmp_path, capsys):
    """--resume checks the checkpoint's kind and what it was trained on (data, pairs, prompts, settings)."""
    out = tmp_path / "out"
    argv = _argv(env, out, "train_mvc", ["--model.base={model}", "--train.max_steps=2", "--train.checkpoint_every=1"])
    run_cli(train_mvc.cli, argv)
    ckpts = sorted((out / "mvc" / "checkpoints").glob("checkpoint-*.pt"))
    assert [p.name for p in ckpts] == ["checkpoint-00000001.pt", "checkpoint-00000002.pt"]
    stamps = [p.stat().st_mtime_ns for p in ckpts]
    for extra, words in (
            (["--resume", "latest", "--data.subset_seed=1"], ["cannot resume", "other data, prompts"]),
            (["--resume", "latest", "--pairs.seed=3"], ["cannot resume", "pairs"]),
            (["--resume", "latest", "--train.lr=0.002"], ["cannot resume", "train.lr: 0.001 -> 0.002"]),
            ([], ["checkpoints of an earlier run", "--resume latest"]),  # a fresh run would mix with them
            (["--resume", str(env.ckpt)], ["classifier checkpoint, not a finetune one"]),
            (["--resume", str(env.unsafe)], ["not unpickled"])):
        code, err = _run("train_mvc", argv + extra, capsys)
        _assert_one_error_line(code, err, words, alone=False)
        assert "weights_only" not in err
    code, err = _run("train_classifier", _argv(env, tmp_path / "clf", "train_classifier", ["--resume", str(ckpts[-1])]),
                     capsys)
    _assert_one_error_line(code, err, ["finetune checkpoint, not a classifier one"], alone=False)
    assert [p.stat().st_mtime_ns for p in ckpts] == stamps  # nothing was touched by the refusals


def test_predict_skips_special_files_instead_of_hanging(env, tmp_path):
    folder = tmp_path / "images"
    _png(folder / "a.png", 1)
    os.mkfifo(folder / "b.png")  # opening a FIFO for reading blocks until someone writes
    out = tmp_path / "pred.jsonl"
    with no_hang():
        run_cli(SCRIPTS["predict"], ["--checkpoint", str(env.ckpt), "--images", str(folder), "--out", str(out)])
    assert [Path(json.loads(line)["file"]).name for line in out.read_text().splitlines()] == ["a.png"]


#################################################################################
#                          Real processes, no traceback                         #
#################################################################################

def test_cli_subprocesses_print_no_traceback(tmp_path):
    """The scripts' `__main__` path: python prints exactly the one line and exits 2."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    runs = {
        "train_mvc.py": ([str(ROOT / "train_mvc.py"), "--config", str(tmp_path / "missing.yaml")],
                         "error: config file not found"),
        "train_classifier.py predict": ([str(ROOT / "train_classifier.py"), "predict", "--checkpoint",
                                         str(tmp_path / "c.pt"), "--images", str(tmp_path)],
                                        "error: classifier checkpoint not found"),
        "run_pipeline.py": ([str(ROOT / "run_pipeline.py"), "--config", str(MICRO), f"--run.output_dir={tmp_path}",
                             "--generate.guidance_scale=0"], "error: config key generate.guidance_scale"),
    }
    procs = {name: subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, (args, _) in runs.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and "Traceback" not in err, (name, proc.returncode, err[-3000:])
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(runs[name][1]), (name, err)
