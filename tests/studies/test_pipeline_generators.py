"""The main job with the rows of another generator (pipeline.generators=[mvc, img2img]) on the micro profile:
each set is generated, evaluated and trained on in stages of its own, results.md has a synthetic-set row and
accuracy rows per generator, runs on different sets never share a folder, and a rerun redoes nothing."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import run_pipeline
from mvc.core.config import load_yaml, make_config, parse_args
from mvc.core.utils import MVCError
from mvc.data.synthetic import set_fingerprint
from mvc.studies.report import collect_results
from tests.helpers import micro_argv, write_fashion_idx

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # whole pipelines at micro scale: seconds to minutes each

GENERATORS = ["mvc", "img2img"]


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory, one_thread):
    """One micro pipeline run (runs real + probabilistic, one seed) with the img2img set beside MVC's."""
    base = tmp_path_factory.mktemp("pipeline_generators")
    data = write_fashion_idx(base / "data")
    out = base / "out"
    argv = micro_argv(data, out, base / "cache", f"--pipeline.generators={json.dumps(GENERATORS)}",
                      '--pipeline.generator_runs=["probabilistic"]')
    report = run_pipeline.cli(argv)
    return out, report, argv


def pipeline_config(out: Path, method: str):
    """The pipeline's config (as it recorded it) for the set of `method`."""
    cfg = make_config(load_yaml(out / "config-pipeline.yaml"))
    return run_pipeline.generator_config(cfg, method, main=method == GENERATORS[0])


def test_each_generator_gets_its_set_its_evaluation_and_its_rows(two_sets):
    out, report, _ = two_sets
    text = report.read_text()
    # the img2img set, evaluated like the MVC set (metrics and CAS), one synthetic-set row each, named by method
    for name in ("synthetic", "synthetic_img2img"):
        ev = json.loads((out / "evaluation" / name / "metrics.json").read_text())
        assert ev["set_fingerprint"] == set_fingerprint(out / name) and ev["cas"]["values"]
    assert "| MVC (`generate_mvc.py`) |" in text and "| img2img (`generate.method=img2img`) |" in text
    # accuracy rows: the main set's runs, then the other generator's runs, each saying which set it trained on
    assert "| run | set | strategy |" in text
    assert "| real | - | real |" in text and "| probabilistic | mvc | probabilistic |" in text
    assert "| probabilistic | img2img | probabilistic |" in text
    rows = collect_results(make_config(load_yaml(out / "config-pipeline.yaml")))
    assert [(r["run"], r["generator"], r["n"]) for r in rows] == [
        ("real", None, 1), ("probabilistic", "mvc", 1), ("probabilistic", "img2img", 1)]
    # each set's stages add their wall time; the tiny profile's own stage names are unchanged
    times = json.loads((out / "stage_times.json").read_text())
    assert list(times) == ["fine-tuning (tiny base, captions, pairs, MVC)", "generation",
                           "evaluation (reference, metrics, CAS)", "classifiers", "generation (img2img)",
                           "evaluation (img2img)", "classifiers (img2img)"]
    assert all(t > 0 for t in times.values())
    # the results CSV names the generator of every row
    with open(out / "results.csv", newline="") as f:
        assert sorted(r["generator"] for r in csv.DictReader(f)) == ["", "img2img", "mvc"]


def test_each_set_keeps_the_configs_it_was_made_and_judged_with(two_sets):
    out, _, _ = two_sets
    for method, name in (("mvc", "synthetic"), ("img2img", "synthetic_img2img")):
        made = load_yaml(out / f"config-generate_{name}.yaml")
        judged = load_yaml(out / f"config-evaluate_{name}.yaml")
        assert made["generate"]["method"] == judged["generate"]["method"] == method


def test_runs_on_different_sets_never_share_a_folder(two_sets):
    out, _, _ = two_sets
    dirs = {}
    for method in GENERATORS:
        cfg = pipeline_config(out, method)
        d = run_pipeline.classifier_run_dir(cfg, "probabilistic", "standard", 0)
        m = json.loads((d / "metrics.json").read_text())
        set_dir = out / ("synthetic" if method == "mvc" else f"synthetic_{method}")
        assert m["generator"] == method and m["synthetic_set"] == set_fingerprint(set_dir)  # trained on its own set
        dirs[method] = d
    assert dirs["mvc"].name == "probabilistic-standard-resnet10t-seed0"  # MVC runs keep their names (resume)
    assert dirs["img2img"].name == "probabilistic-standard-resnet10t-img2img-seed0"
    # a run that uses no synthetic image is the same for every generator: one folder
    real = {run_pipeline.classifier_run_dir(pipeline_config(out, m), "real", "standard", 0) for m in GENERATORS}
    assert len(real) == 1
    # classifier.synthetic_dir: the run is named after the method the set records, not after generate.method
    cfg = pipeline_config(out, "mvc")
    cfg.classifier.synthetic_dir = str(out / "synthetic_img2img")
    assert run_pipeline.classifier_run_dir(cfg, "probabilistic", "standard", 0) == dirs["img2img"]


def test_rerun_resumes_every_set_without_redoing_work(two_sets):
    out, _, argv = two_sets
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in {".png", ".json", ".safetensors"}
              and not {"figures", "synthetic_grids", "synthetic_img2img_grids"} & set(p.parts)
              and p.name != "stage_times.json"}
    victim = run_pipeline.classifier_run_dir(pipeline_config(out, "img2img"), "probabilistic", "standard", 0)
    (victim / "metrics.json").unlink()  # as if interrupted: only this run of the img2img set is trained again
    run_pipeline.cli(argv)
    assert (victim / "metrics.json").is_file()
    changed = [p for p, t in stamps.items() if p.exists() and p.stat().st_mtime_ns != t and victim not in p.parents]
    assert not changed, changed[:5]


def test_only_generators_that_sample_the_finetuned_model_fine_tune():
    def cfg(*extra):
        return parse_args(run_pipeline.build_parser("x"), ["--config", str(ROOT / "configs" / "micro.yaml"), *extra])[0]

    assert run_pipeline.needs_finetuning(cfg())
    assert run_pipeline.needs_finetuning(cfg("--pipeline.generators=[img2img, mvc_nomix]"))
    assert not run_pipeline.needs_finetuning(cfg("--pipeline.generators=[txt2img, img2img]"))
    for extra, match in ((["--pipeline.generators=[mvc, dreambooth2]"], "pipeline.generators: unknown value 'dreambooth2'"),
                         (["--pipeline.generators=[mvc, img2img]", "--generate.strength=0.01"], "no img2img denoising"),
                         (["--pipeline.generator_runs=[real]", "--pipeline.generators=[mvc, txt2img]"],
                          "uses no synthetic image"),
                         (["--generate.method=txt2img"], "not in pipeline.generators")):
        with pytest.raises(MVCError, match=match):
            run_pipeline.check_runs(cfg(*extra))
