"""The miniature full-profile run, tests/smoke/run.sh: the real configs/<dataset>.yaml on CPU, overridden for
scale only, through scripts/_reproduce.sh (BLIP-2 captions, fine-tuning and generation under accelerate launch,
then the evaluation, every classifier run of the config and the report).

CI runs Caltech101 (a pretrained ResNet-50 from the private hub cache, a drawn test split) through
scripts/gpu_check.sh --cpu, the GPU check at the miniature scale (the same run, then its performance summary and
the same checks); MVC_TEST_FULL=1 adds
CIFAR-10, CIFAR-100 (WRN-28-10, python batches), the brain-tumour MRI folders (three recipes, two CPU processes
for captioning, fine-tuning and generation) and Tiny ImageNet (its release's layout, ResNet-18 from scratch).
MVC_SMOKE_PRECISION=bf16 (the accelerate config's precision) works too
but is slow on a CPU (about 15 minutes for the brain-tumour run).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FULL = os.environ.get("MVC_TEST_FULL") == "1"


# dataset -> (processes of captioning, fine-tuning and generation; the accelerate config's mixed precision)
SETTINGS = {"caltech101": (1, "no"), "cifar10": (1, "no"), "cifar100": (1, "no"), "brain_tumor": (2, "no"),
            "tiny_imagenet": (1, "no")}


class Run:
    """One miniature run (`scripts/gpu_check.sh --cpu` for Caltech101, else `tests/smoke/run.sh DATASET`) as a
    process of its own: it writes under `root/work`, its stdout and stderr go to files beside it (a pipe nobody
    reads could fill and stall it). `nice` lowers its priority (the background run below)."""

    def __init__(self, dataset: str, root: Path, nice: int = 0):
        processes, precision = SETTINGS[dataset]
        env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "MVC_SMOKE_PRECISION": precision,
               "MVC_LAUNCH_ARGS": f"--multi_gpu --num_processes {processes}" if processes > 1 else ""}
        script = ["scripts/gpu_check.sh", "--cpu"] if dataset == "caltech101" else ["tests/smoke/run.sh", dataset]
        self.root, self.work = Path(root), Path(root) / "work"
        self.stdout, self.stderr = self.root / "stdout.txt", self.root / "stderr.txt"
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.proc = subprocess.Popen(["bash", *script, str(self.work)], cwd=ROOT, env=env, stdout=out, stderr=err,
                                         start_new_session=True,  # its own process group: stop() ends all of it
                                         preexec_fn=(lambda: os.nice(nice)) if nice else None)

    def result(self, timeout: float = 3600) -> subprocess.CompletedProcess:
        """Wait for the run (at most `timeout` seconds from now): exit status, stdout and stderr."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        return subprocess.CompletedProcess(self.proc.args, rc, self.stdout.read_text(), self.stderr.read_text())

    def stop(self) -> None:
        """End the run and everything it started, if it still runs."""
        if self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 30)):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=wait)
                return
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue


# The CI run (Caltech101) takes a couple of minutes of one core, nearly all of it in processes of its own; when its
# test is selected, conftest.py starts it as soon as collection ends, at low priority, beside the rest of the
# suite (whose process uses one core), and the test waits for it and checks it. MVC_TEST_SMOKE_INLINE=1 runs it
# in the test instead.
BACKGROUND_DATASET = "caltech101"
BACKGROUND: dict[str, Run] = {}


def start_background(items: list, make_root) -> bool:
    """Start the background run (in the folder `make_root()` returns) when the test of BACKGROUND_DATASET is among
    `items`; whether it was started."""
    if os.environ.get("MVC_TEST_SMOKE_INLINE") == "1" or BACKGROUND_DATASET in BACKGROUND:
        return False
    if not any(getattr(i, "originalname", None) == "test_miniature_full_profile_run"
               and getattr(i, "callspec", None) is not None and i.callspec.params.get("dataset") == BACKGROUND_DATASET
               for i in items):
        return False
    BACKGROUND[BACKGROUND_DATASET] = Run(BACKGROUND_DATASET, make_root(), nice=10)
    return True


def stop_background() -> None:
    """End and remove the background runs no test took (the session stopped early)."""
    while BACKGROUND:
        _, run = BACKGROUND.popitem()
        run.stop()
        shutil.rmtree(run.root, ignore_errors=True)


def summary(dataset: str, work: Path) -> subprocess.CompletedProcess:
    """`python -m tests.smoke.harness summary` on the run in `work`: its exit status and stderr. In-process (its `main`, as
    `python -m tests.smoke.harness` runs it), which spares a Python start-up with torch's imports per call."""
    import contextlib
    import io

    from tests.smoke import harness as smoke_full

    over = (work / "overrides.txt").read_text().split("\n")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = smoke_full.main(["summary", dataset, str(work), *filter(None, over)])
    return subprocess.CompletedProcess(["smoke_full.py", "summary"], rc, out.getvalue(), err.getvalue())


@pytest.mark.parametrize("dataset", [
    "caltech101",
    *[pytest.param(d, marks=pytest.mark.skipif(not FULL, reason="a few minutes each on 2 CPU cores: MVC_TEST_FULL=1"))
      for d in ("cifar10", "cifar100", "brain_tumor", "tiny_imagenet")],
])
@pytest.mark.slow
def test_miniature_full_profile_run(dataset, tmp_path):
    run = BACKGROUND.pop(dataset, None) or Run(dataset, tmp_path)  # started at collection's end (conftest.py), or now
    try:
        check_run(dataset, run)
    finally:  # its classifier checkpoints take gigabytes (2 GB here, 11 GB for the brain-tumour recipes)
        run.stop()
        shutil.rmtree(run.work, ignore_errors=True)


def check_run(dataset: str, run: Run) -> None:
    """Wait for the miniature run of `dataset` and check its summary, then that its checks can fail."""
    import run_pipeline
    from mvc.core.config import load_yaml, make_config

    work = run.work
    r = run.result()
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout)
    if "stages" in out:  # scripts/gpu_check.sh: its measures, and the miniature run's summary inside
        check_measures(out)
    s = out.get("smoke", out)
    assert s["checks"] == "passed"
    processes, precision = SETTINGS[dataset]
    # BLIP-2 (the config's captioner) through transformers, on the CPU in fp32, sharded over the processes
    cap = s["captioner"]
    assert (cap["captioner"], cap["dtype"], cap["processes"]) == ("blip2", "float32", processes)
    assert cap["device"].startswith("cpu") and cap["images"] > 0
    # the SD-1.5-structured base, fine-tuned at the (scaled) resolution; generation samples at it
    assert s["finetune"]["resolution"] == 64 and s["finetune"]["steps"] == 2 and s["generate"]["image_size"] == [64, 64]
    assert s["generate"]["processes"] == processes and s["generate"]["dtype"] == "fp32"  # fp32: the CPU default
    # the configs leave precision to accelerate: what its config file says is what ran, in every stage
    assert (s["finetune"]["mixed_precision"], s["finetune"]["grad_accum"]) == (precision, 1)
    assert s["classifier"]["mixed_precision"] == precision
    # every classifier run of the config (every recipe), each with the same 3 optimizer steps
    cfg = make_config(load_yaml(ROOT / "configs" / f"{dataset}.yaml"))
    expected = {(run, rc.classifier.backbone) for rc in run_pipeline.recipe_configs(cfg) for run in cfg.pipeline.runs}
    runs = s["classifier"]["runs"]
    assert {(x["run"], x["backbone"]) for x in runs} == expected and {x["steps"] for x in runs} == {3}
    for x in runs:
        if x["run"] == "two_phase":
            assert sum(x["phase_steps"].values()) == 3 and len(x["phase_steps"]) == 2
    real = next(x for x in runs if x["run"] == "real")
    prob = next(x for x in runs if x["run"] == "probabilistic")
    assert prob["images_seen"] > real["images_seen"]  # more images in the same steps, and reported
    report = Path(s["report"]).read_text()
    assert "optimizer steps for every run" in report and "| two_phase |" in report
    # img2img's and DreamBooth's sets beside MVC's, from the SD-1.5-structured base (DreamBooth trained on it first)
    for method in ("img2img", "dreambooth"):
        assert s["generators"][method]["methods"] == [method] and s["generators"][method]["images"] > 0
        assert s["generators"][method]["image_size"] == [64, 64]
        assert f"| probabilistic | {method} | probabilistic |" in report
    assert (work / "out" / "dreambooth" / "final" / "model_index.json").is_file()

    # the checks can fail: a run with another budget, an image at another size
    metrics = next((work / "out" / "classifier").glob("concat-*/metrics.json"))
    m = json.loads(metrics.read_text())
    metrics.write_text(json.dumps({**m, "steps": m["steps"] + 1}))
    bad = summary(dataset, work)
    assert bad.returncode == 1 and "took different optimizer steps" in bad.stderr
    metrics.write_text(json.dumps(m))
    from PIL import Image

    png = next((work / "out" / "synthetic").rglob("*.png"))
    Image.open(png).resize((32, 32)).save(png)
    bad = summary(dataset, work)
    assert bad.returncode == 1 and "the model was fine-tuned at 64 px" in bad.stderr


def check_measures(out: dict) -> None:
    """scripts/gpu_check.sh's summary on the CPU: every stage reached and measured (throughput, the share of the
    matmul peak its FLOPs reach); GPU memory is not measured off CUDA; train.gradient_checkpointing=null is off."""
    st = out["stages"]
    assert out["run"]["exit"] == 0 and out["peak"]["tflops"] > 0 and out["checks"] == "passed"
    for name in ("captioning", "fine-tuning", "generation (mvc)", "generation (img2img)", "generation (dreambooth)"):
        assert st[name]["reached"] and st[name]["images_per_s"] > 0 and st[name]["peak_memory_gb"] is None, name
    for name in ("fine-tuning", "generation (mvc)", "generation (img2img)", "generation (dreambooth)", "classifiers"):
        assert st[name]["share_of_peak"] > 0 and st[name]["gflop_per_image"] > 0, name
    assert st["fine-tuning"]["gradient_checkpointing"] is False and st["fine-tuning"]["steps"] == 2
    assert st["generation (mvc)"]["unet_rows_per_image"] == 3 * 2  # text + image guidance, 2 steps
    assert st["generation (mvc)"]["batch_size"] == 16  # generate.batch_size=null off CUDA
    assert st["classifiers"]["steps_per_s"] > 0 and st["classifiers"]["runs"] >= 5


@pytest.mark.slow
def test_reproduce_script_finds_the_run_where_the_overrides_put_it(tmp_path):
    """scripts/_reproduce.sh resolves run.output_dir with the user's overrides (not from the YAML alone): a
    checkpoint there makes fine-tuning resume, a finished pipeline folder skips it. `accelerate launch` is the
    edge replaced here: a stand-in python records the launches instead of running them."""
    fake = tmp_path / "python"
    log = tmp_path / "launches.txt"
    fake.write_text(f'#!/usr/bin/env bash\nif [ "$1" = "-m" ] && [ "$2" = "accelerate.commands.launch" ]; then\n'
                    f'  shift 2; echo "$*" >> {log}; exit 0\nfi\nexec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    out = tmp_path / "elsewhere"
    env = {**os.environ, "PYTHON": str(fake), "MVC_LAUNCH_ARGS": "--multi_gpu --num_processes 2 --mixed_precision bf16"}

    def launches() -> list[str]:
        log.unlink(missing_ok=True)
        r = subprocess.run(["bash", "scripts/_reproduce.sh", "configs/cifar10.yaml", f"--run.output_dir={out}"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return log.read_text().splitlines()

    (out / "mvc" / "checkpoints").mkdir(parents=True)
    (out / "mvc" / "checkpoints" / "checkpoint-00000100.pt").write_bytes(b"")
    first = launches()
    assert [line.split(".py")[0].split()[-1] for line in first] == ["caption_mvc", "train_mvc", "generate_mvc",
                                                                    "run_pipeline"]
    assert "--resume latest" in first[1] and all(f"--run.output_dir={out}" in line for line in first)
    assert first[0].startswith("--multi_gpu --num_processes 2 --mixed_precision bf16 caption_mvc.py")
    assert first[3].startswith("--mixed_precision bf16 --num_processes 1 run_pipeline.py")  # one process
    (out / "mvc" / "final").mkdir(parents=True)
    (out / "mvc" / "final" / "model_index.json").write_text("{}")
    assert [line.split(".py")[0].split()[-1] for line in launches()] == ["caption_mvc", "generate_mvc", "run_pipeline"]
    bad = subprocess.run(["bash", "scripts/_reproduce.sh", "configs/cifar10.yaml", "--run.outputdir=x"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: unknown config key 'run.outputdir'")
