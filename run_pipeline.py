"""The main job: the whole MVC pipeline end to end, then a results report.

    python run_pipeline.py --config configs/tiny.yaml
    python run_pipeline.py --config configs/tiny.yaml --pipeline.generators='[mvc, mvc_nomix, txt2img, img2img]'

Stages: fine-tuning (tiny base, captions, pairs, MVC) -> generation -> evaluation -> one classifier per
(recipe, run, seed) -> `results.md` (mean +- std, steps and images per run, stage wall times, figures). Each
stage resumes. `pipeline.generators` adds the sets of other generators (the first is the main set), each
generated, evaluated and trained on with `pipeline.generator_runs`; MVC is fine-tuned only when a generator
samples the fine-tuned model. The plan is mvc/studies/pipeline.py, the report mvc/studies/report.py; this script
runs the stages through the other scripts' `main`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import evaluate_synthetic
import generate_mvc
import train_classifier
import train_mvc
from mvc.core.checkpoint import list_checkpoints
from mvc.core.config import Config, build_parser, parse_args, save_config
from mvc.core.paths import RunPaths
from mvc.core.utils import MVCError, atomic_write_json, run_cli
from mvc.studies.pipeline import (
    check_runs,
    classifier_run_dir,
    extra_generators,
    generator_config,
    long_runs,
    needs_finetuning,
    recipe_configs,
    run_config,
    split_run,
)
from mvc.studies.report import profile_key, update_readme, write_results

#################################################################################
#                                     Stages                                    #
#################################################################################

def read_times(path: Path) -> dict:
    """The stage wall times of earlier (interrupted) runs of this pipeline, {} for a new one."""
    if not path.is_file():
        return {}
    try:
        times = json.loads(path.read_text())
    except ValueError:
        times = None
    if not isinstance(times, dict) or not all(isinstance(v, (int, float)) for v in times.values()):
        raise MVCError(f"{path} is not a stage-times file of this pipeline; delete it")
    return times


# the stages' names in stage_times.json and the report, by the function that runs each (bench/profile_stacks.py
# files a profile's samples under them too)
STAGE_NAMES = {"stage_finetune": "fine-tuning (tiny base, captions, pairs, MVC)",
               "stage_selectors": "curation: selectors", "stage_generate": "generation",
               "stage_evaluate": "evaluation (reference, metrics, CAS)", "stage_classifiers": "classifiers"}


def run_stage(name: str, fn, times: dict, times_path: Path) -> None:
    """Run one stage, add its wall time to `times` (accumulated over resumed runs) and save them."""
    print(f"\n=== {name} ===", flush=True)
    t0 = time.perf_counter()
    fn()
    times[name] = times.get(name, 0.0) + time.perf_counter() - t0
    atomic_write_json(times_path, times)


def stage_finetune(cfg: Config) -> None:
    """train_mvc, resumed from its latest checkpoint when one exists; skipped when done."""
    paths = RunPaths.of(cfg)
    if (paths.mvc / "final" / "model_index.json").is_file():
        print("fine-tuned pipeline found: skipping")
        return
    train_mvc.main(copy_config(cfg), resume="latest" if list_checkpoints(paths.checkpoints) else None)


def stage_selectors(cfg: Config) -> None:
    """Curation's selectors: classifiers of the labelled subset, one per fold (finished ones are skipped)."""
    from mvc.core.distributed import make_accelerator
    from mvc.generation.curation import train_selectors

    train_selectors(cfg, make_accelerator(cfg.classifier.mixed_precision))


def stage_generate(cfg: Config) -> None:
    """generate_mvc (idempotent: it only makes the missing images)."""
    generate_mvc.main(copy_config(cfg))


def stage_evaluate(cfg: Config) -> None:
    """evaluate_synthetic on the synthetic set (fidelity, diversity, FD, novelty, CAS); skipped when the
    report is of this very set."""
    from mvc.data.synthetic import set_fingerprint, set_name

    paths = RunPaths.of(cfg)
    done = paths.evaluation / set_name(paths.synthetic) / "metrics.json"
    if done.is_file() and json.loads(done.read_text()).get("set_fingerprint") == set_fingerprint(paths.synthetic):
        print("evaluation of this synthetic set found: skipping")
        return
    evaluate_synthetic.main(copy_config(cfg))


def stage_classifiers(cfg: Config, runs: list[str] | None = None) -> None:
    """One classifier per (recipe, run, seed) (runs: pipeline.runs unless given), on the set of cfg's
    generate.method; finished runs are skipped, interrupted ones resumed."""
    for rc in recipe_configs(cfg):
        for run in (runs if runs is not None else rc.pipeline.runs):
            strategy, augment = split_run(run, rc.classifier.augment)
            for seed in rc.pipeline.seeds:
                rdir = classifier_run_dir(rc, strategy, augment, seed)
                if (rdir / "metrics.json").is_file():
                    print(f"{rdir.name}: done, skipping")
                    continue
                resume = "latest" if list_checkpoints(rdir / "checkpoints") else None
                train_classifier.main(copy_config(run_config(rc, strategy, augment, seed)), resume=resume)


def copy_config(cfg: Config) -> Config:
    """A deep copy, so that a stage recording its drawn seed does not change the pipeline's config."""
    import copy

    return copy.deepcopy(cfg)


#################################################################################
#                                    Main                                       #
#################################################################################

def main(cfg: Config, update_readme_too: bool = False) -> Path:
    """Run every stage (resuming what is done) and write the report."""
    from mvc.core.seeds import resolve_seed
    from mvc.core.stage import check_precisions

    check_runs(cfg)
    check_precisions(cfg)  # before the first stage: a classifier precision the device lacks must not wait for it
    cfg = generator_config(cfg, cfg.pipeline.generators[0], main=True)  # generate.method: the main set's
    cfg.run.seed = resolve_seed(cfg.run.seed)  # one drawn seed for every stage, recorded in config-pipeline.yaml
    paths = RunPaths.of(cfg)
    paths.check_outputs(cfg)
    save_config(cfg, paths.config_file("pipeline"))
    times = read_times(paths.stage_times)
    if needs_finetuning(cfg):  # txt2img / img2img alone sample the base: nothing to fine-tune
        run_stage(STAGE_NAMES["stage_finetune"], lambda: stage_finetune(cfg), times, paths.stage_times)
    if cfg.curation.filters:  # the cross-fitted selectors of the labelled subset, shared by every curated set
        run_stage(STAGE_NAMES["stage_selectors"], lambda: stage_selectors(cfg), times, paths.stage_times)
    run_stage(STAGE_NAMES["stage_generate"], lambda: stage_generate(cfg), times, paths.stage_times)
    run_stage(STAGE_NAMES["stage_evaluate"], lambda: stage_evaluate(cfg), times, paths.stage_times)
    run_stage(STAGE_NAMES["stage_classifiers"], lambda: stage_classifiers(cfg), times, paths.stage_times)
    for gc in extra_generators(cfg):  # the other generators' sets, each in stages of its own
        m = gc.generate.method
        run_stage(f"generation ({m})", lambda gc=gc: stage_generate(gc), times, paths.stage_times)
        run_stage(f"evaluation ({m})", lambda gc=gc: stage_evaluate(gc), times, paths.stage_times)
        run_stage(f"classifiers ({m})", lambda gc=gc: stage_classifiers(gc, gc.pipeline.generator_runs), times,
                  paths.stage_times)
    for spec, (lc, run) in zip(cfg.pipeline.long_runs, long_runs(cfg)):
        run_stage(f"classifiers ({spec}, {cfg.pipeline.long_factor}x budget)",
                  lambda lc=lc, run=run: stage_classifiers(lc, [run]), times, paths.stage_times)
    report = write_results(cfg, times)
    print(f"\nreport: {report}\n")
    print(report.read_text())
    if update_readme_too:
        update_readme(report, profile_key(cfg))
    return report


def cli(argv: list[str] | None = None) -> Path:
    """Parse the config and flags, then run the pipeline."""
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--update-readme", action="store_true",
                        help="Copy results.md and its figures into README.md's results section of this profile "
                        "(named by run.output_dir's last folder: tiny, small).")
    cfg, args = parse_args(parser, argv)
    return main(cfg, update_readme_too=args.update_readme)


def console() -> None:
    """Entry point of the `mvc-pipeline` command."""
    run_cli(cli)


if __name__ == "__main__":
    console()
