"""The main job end to end: run_pipeline.py on the micro profile writes every artefact and resumes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

import run_pipeline
from mvc.core.config import load_yaml, make_config
from mvc.core.utils import MVCError, read_jsonl
from mvc.studies.report import README_BEGIN, README_END
from tests.helpers import micro_argv, write_fashion_idx

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # whole pipelines at micro scale: seconds to minutes each

RUNS = ["real", "real+randaugment", "concat", "two_phase", "probabilistic"]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, one_thread):
    """One micro run of the whole pipeline with all five baselines (one thread: micro models)."""
    base = tmp_path_factory.mktemp("pipeline")
    data = write_fashion_idx(base / "data")
    out = base / "out"
    argv = micro_argv(data, out, base / "cache", f"--pipeline.runs={json.dumps(RUNS)}", "--pipeline.seeds=[0, 1]")
    report = run_pipeline.cli(argv)
    return out, report, argv


def test_every_artefact_is_written(pipeline_run):
    out, report, _ = pipeline_run
    assert report == out / "results.md"
    # generator: the fine-tuned pipeline folder, its log and validation grids
    assert (out / "mvc" / "final" / "model_index.json").is_file()
    assert read_jsonl(out / "mvc" / "log.jsonl")
    # synthetic set: one metadata line per PNG, every PNG decodes
    meta = read_jsonl(out / "synthetic" / "metadata.jsonl")
    pngs = sorted(p.relative_to(out / "synthetic").as_posix() for p in (out / "synthetic").rglob("*.png"))
    assert pngs and sorted(m["file"] for m in meta) == pngs
    for p in pngs:
        Image.open(out / "synthetic" / p).load()
    assert list((out / "synthetic_grids").glob("*.png"))
    # classifiers: every (run, seed) has metrics, and the report has a row per run with 2 seeds
    text = report.read_text()
    cfg = make_config(load_yaml(out / "config-pipeline.yaml"))
    for run in RUNS:
        strategy, augment = run_pipeline.split_run(run)
        for seed in (0, 1):
            rdir = run_pipeline.classifier_run_dir(cfg, strategy, augment or cfg.classifier.augment, seed)
            m = json.loads((rdir / "metrics.json").read_text())
            assert 0.0 <= m["last"]["accuracy"] <= 1.0
        assert f"| {run} |" in text
    assert text.count("| 2 |") == len(RUNS)  # each row averages two seeds
    assert Image.open(out / "figures" / "accuracy.png").size[0] > 300
    assert Image.open(out / "figures" / "samples.png").size[0] > 2 * 16  # more than one 16-px cell
    # synthetic-set evaluation: its metrics beside the accuracy table, and the per-class figure
    ev = json.loads((out / "evaluation" / "synthetic" / "metrics.json").read_text())
    assert 0.0 <= ev["fidelity"]["overall"] <= 1.0
    assert "### The synthetic set" in text and "label fidelity" in text.lower()
    assert Image.open(out / "figures" / "synthetic_per_class.png").size[0] > 300
    times = json.loads((out / "stage_times.json").read_text())
    assert len(times) == 4 and all(t > 0 for t in times.values())


def test_rerun_resumes_without_redoing_finished_work(pipeline_run):
    out, report, argv = pipeline_run
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in {".png", ".json", ".safetensors"}
              and not {"figures", "synthetic_grids"} & set(p.parts) and p.name != "stage_times.json"}
    # (the report, its figures and the sample grids are cheap and are drawn again on every run)
    # a finished classifier run disappears (as if interrupted before it ended): only it is redone
    victim = run_pipeline.classifier_run_dir(
        make_config(load_yaml(out / "config-pipeline.yaml")), "concat", "standard", 1)
    (victim / "metrics.json").unlink()
    run_pipeline.cli(argv)
    assert (victim / "metrics.json").is_file()
    changed = [p for p, t in stamps.items() if p.exists() and p.stat().st_mtime_ns != t and victim not in p.parents]
    assert not changed, changed[:5]


def test_readme_results_section_is_replaced_verbatim(pipeline_run, tmp_path):
    out, report, _ = pipeline_run
    readme = tmp_path / "README.md"
    marks = {p: (README_BEGIN.format(profile=p), README_END.format(profile=p))
             for p in ("tiny", "small")}
    readme.write_text(f"intro\n\n{marks['tiny'][0]}\nold table\n{marks['tiny'][1]}\n\n"
                      f"{marks['small'][0]}\nsmall table\n{marks['small'][1]}\noutro\n")
    run_pipeline.update_readme(report, "tiny", readme=readme, docs=tmp_path / "docs")
    text = readme.read_text()
    assert "old table" not in text and text.startswith("intro") and text.rstrip().endswith("outro")
    assert "small table" in text  # another profile's section is left alone
    with pytest.raises(MVCError, match="no results markers for profile 'medium'"):
        run_pipeline.update_readme(report, "medium", readme=readme, docs=tmp_path / "docs")
    assert "| real |" in text and (tmp_path / "docs" / "accuracy.png").is_file()
    assert f"]({(tmp_path / 'docs').as_posix()}/accuracy.png)" in text


def test_diagnosis_measures_each_stage_of_the_chain(pipeline_run, tmp_path):
    """scripts/diagnose_generator.py on the pipeline's fine-tuned model: one row per stage and grid point; the
    row of real images at the model's own resolution scores exactly what the reference scores on them."""
    out, _, argv = pipeline_run
    import diagnose_generator

    cfg = make_config(load_yaml(out / "config-pipeline.yaml"))
    selector = run_pipeline.classifier_run_dir(cfg, "real", cfg.classifier.augment, 0)  # labelled data only
    rows = diagnose_generator.cli(argv + ["--variants=1", "--guidance", "2.0", "--image-guidance", "4.0",
                                          "--out", str(tmp_path / "diag"), "--selector", str(selector)])
    stages = [r["stage"] for r in rows]
    grid = 3  # image 4.0 at the configured text scale, text 2.0 at the configured image scale, the configured pair
    assert stages == ["real", "vae", "base"] + ["fine-tuned"] * (grid + len(cfg.mixing.ops))
    ev = json.loads((out / "evaluation" / "synthetic" / "metrics.json").read_text())
    assert rows[0]["fidelity"] == ev["reference_accuracy_on_real"]  # micro data is at the model's 16 px already
    assert {(r["guidance_scale"], r["image_guidance_scale"]) for r in rows[3:3 + grid]} == {
        (cfg.generate.guidance_scale, 4.0), (2.0, cfg.generate.image_guidance_scale),
        (cfg.generate.guidance_scale, cfg.generate.image_guidance_scale)}
    assert [r["ops"] for r in rows[3 + grid:]] == [[op] for op in cfg.mixing.ops]
    for r in rows[3:]:  # each generated row is a synthetic set in the project's format, one image per source
        assert r["images"] == 20 and 0.0 <= r["fidelity"] <= 1.0
    assert all(0.0 <= r["selector_agreement"] <= 1.0 for r in rows)
    text = (tmp_path / "diag" / "diagnose.md").read_text()
    assert "selector agreement (%)" in text
    assert "VAE round trip" in text and text.count("| fine-tuned,") == 2 * (grid + len(cfg.mixing.ops))  # 2 tables
    assert Image.open(tmp_path / "diag" / "diagnose.png").size[0] > 300


def test_the_reference_may_not_select_or_filter(pipeline_run, tmp_path):
    """The evaluation-only reference refuses to be a diagnosis selector or a generation filter, in one line."""
    out, _, argv = pipeline_run
    import diagnose_generator

    import generate_mvc
    from mvc.core.utils import MVCError

    ref = next((out.parent / "cache" / "reference").glob("*/reference.pt"))
    with pytest.raises(MVCError, match="never selects"):
        diagnose_generator.cli(argv + ["--variants=1", "--out", str(tmp_path / "d"), "--selector", str(ref)])
    with pytest.raises(MVCError, match="never filters"):
        generate_mvc.cli(argv + [f"--generate.filter_checkpoint={ref}", f"--generate.out_dir={tmp_path / 'syn'}"])


def test_granularity_ablation_marks_no_ops_and_reports_effective_k(pipeline_run, tmp_path, monkeypatch):
    """scripts/ablate_mixing.py on the pipeline's model, with a run folder given relative to the working
    directory: every setting over two seeds, the identity shuffle and the embeds-stage shuffle (which
    cross-attention cannot see) marked as no-ops, the k actually used, figure, TensorBoard, downstream."""
    out, _, argv = pipeline_run
    import ablate_mixing

    monkeypatch.chdir(out.parent)
    argv = [a if not a.startswith("--run.output_dir=") else f"--run.output_dir={out.name}" for a in argv]
    rows = ablate_mixing.cli(argv + ["--k", "1", "2", "--s", "2", "--m", "1", "--stages", "tokens", "embeds",
                                     "--modes", "shuffle", "--windows", "caption", "--seeds", "0", "1",
                                     "--sources", "2", "--variants", "1", "--downstream", "fine s=2 m=2"])
    by = {r["setting"]: r for r in rows}
    assert rows[0]["setting"] == "none" and rows[0]["fidelity"]["mean"] >= 0
    assert by["coarse shuffle k=1 tokens"]["noop"] == "a shuffle of one token is the identity"
    assert by["coarse shuffle k=1 tokens"]["fidelity"] is None  # not generated at all
    emb, tok = by["coarse shuffle k=2 embeds"], by["coarse shuffle k=2 tokens"]
    assert emb["shift"]["mean"] < 0.05 and "images unchanged" in emb["noop"]  # float rounding at most
    assert tok["shift"]["mean"] > 5 * emb["shift"]["mean"] and tok["seeds"] == 2
    assert 1.0 <= tok["effective_k"] <= 2.0  # the k used (short captions clamp it), not the k asked for
    assert by["fine m=1 s=2"]["effective_m"] == 1.0
    res = out / "ablation_mixing"
    text = (res / "ablation.md").read_text()
    assert "| coarse shuffle k=2 tokens |" in text and "mean ± std over seeds" in text
    assert Image.open(res / "ablation.png").size[0] > 300 and list((res / "tb").iterdir())
    assert not (out / out.name).exists()  # nothing was written into a doubled run folder
    down = json.loads((res / "downstream.json").read_text())
    assert down[0]["setting"] == "fine s=2 m=2" and 0 <= down[0]["accuracy"]["mean"] <= 1


def test_recipes_are_classifier_mappings_checked_before_any_stage():
    cfg = make_config(load_yaml(ROOT / "configs" / "brain_tumor.yaml"))
    recipes = run_pipeline.recipe_configs(cfg)
    assert [r.classifier.backbone for r in recipes] == ["resnet50", "wide_resnet50_2", "efficientnet_b0"]
    eff = recipes[2].classifier
    assert (eff.optimizer, eff.lr, eff.scheduler, eff.steps) == ("sgd", 0.02, "multistep", 5750)  # the budget stays
    assert recipes[1].classifier.optimizer == "adam" and recipes[0].train == cfg.train
    run_pipeline.check_runs(cfg)
    for bad, words in [([{"backbone": "resnet50"}, {"backbone": "resnet50", "lr": 0.1}], "two recipes use backbone"),
                       ([{"backbone": "resnet50", "strategy": "concat"}], "come from pipeline.runs"),
                       ([{"optimizr": "sgd"}], "pipeline.recipes[0]: unknown config key 'classifier.optimizr'"),
                       ([{"backbone": "resnet_nope"}], "unknown backbone 'resnet_nope'")]:
        with pytest.raises(MVCError, match=re.escape(words)):
            run_pipeline.check_runs(make_config(load_yaml(ROOT / "configs" / "brain_tumor.yaml"),
                                                {"pipeline.recipes": bad}))


def test_reports_name_the_split_they_evaluate_on():
    from mvc.data import describe_eval_split

    say = {d: describe_eval_split(make_config(load_yaml(ROOT / "configs" / f"{d}.yaml")).data)
           for d in ("cifar10", "caltech101", "brain_tumor", "tiny")}
    assert say["caltech101"].startswith("a seeded, class-stratified 20% test split") and "official" not in \
        say["caltech101"].replace("no official", "")
    assert {say[d] for d in ("cifar10", "brain_tumor", "tiny")} == {"the official test split"}


def test_readme_section_is_named_by_profile_and_comparison():
    tiny = make_config({"run": {"output_dir": "outputs/tiny"}})
    compare = make_config({"run": {"output_dir": "outputs/tiny"}, "pipeline": {"generators": ["mvc", "img2img"]}})
    assert run_pipeline.profile_key(tiny) == "tiny"
    assert run_pipeline.profile_key(compare) == "tiny-generators"  # never overwrites make demo's section
