"""Evaluate a synthetic set: label fidelity, diversity, Fréchet distance, novelty and CAS, judged by an
evaluation-only reference classifier trained on the dataset's full training split.

    python evaluate_synthetic.py --config configs/tiny.yaml                       # <run.output_dir>/synthetic
    python evaluate_synthetic.py --config configs/tiny.yaml --set path/to/set --no-cas
    python evaluate_synthetic.py --config configs/tiny.yaml --real-curve          # + equivalent real images

Writes <run.output_dir>/evaluation/<set>/{metrics.json, report.md, figure.png, tb/}. The reference is
trained once per dataset (cached under evaluate.cache_dir) and never trains, filters or selects anything.
With --real-curve, real-only classifiers at evaluate.real_curve labelled sizes (same seeds and budget)
give an accuracy-vs-size curve, and each run of pipeline.runs that has finished is reported as the number
of real images per class it is worth (<run.output_dir>/evaluation/real_curve.{json,md,png}).
"""

from __future__ import annotations

from mvc.core.config import Config, build_parser, parse_args
from mvc.core.utils import run_cli


def main(cfg: Config, set_dir: str | None = None, name: str | None = None, cas: bool | None = None,
         real_curve: bool = False) -> dict:
    """Start the stage, evaluate the set (and the real-only curve when asked)."""
    from pathlib import Path

    from mvc.core.paths import RunPaths
    from mvc.core.stage import start_stage
    from mvc.data.synthetic import set_name
    from mvc.evaluation.evaluate import evaluate_set, summary_row, table_markdown

    where = Path(set_dir) if set_dir else RunPaths.of(cfg).synthetic
    name = name or set_name(where)  # the set's folder under evaluation/, and its config file
    stage = start_stage(cfg, f"evaluate_{name}", precision_from="classifier")
    record = evaluate_set(cfg, where, stage.accelerator, name=name, cas=cas, progress=stage.is_main)
    if stage.is_main:
        print(table_markdown([(record["name"], summary_row(record))]))
        print(f"report: {stage.paths.evaluation / record['name'] / 'report.md'}")
    if real_curve:
        record["real_curve"] = write_real_curve(cfg, stage)
    return record


def write_real_curve(cfg: Config, stage) -> dict:
    """The real-only curve, and what each finished pipeline run is worth in real images per class."""
    import numpy as np

    from mvc.classifier.outputs import run_accuracies
    from mvc.core.utils import atomic_write_json, atomic_write_text
    from mvc.evaluation.evaluate import curve_figure, equivalents, real_curve

    curve = real_curve(cfg, stage.accelerator)
    accs = {r: float(np.mean(v)) for r, v in run_accuracies(cfg, cfg.pipeline.runs, cfg.pipeline.seeds,
                                                            cfg.classifier.augment).items() if v}
    eq = equivalents(curve, accs)
    out = stage.paths.evaluation
    if stage.is_main:
        atomic_write_json(out / "real_curve.json", {"curve": curve, "accuracy": accs, "equivalent": eq})
        lines = ["| run | accuracy (%) | worth (real images per class) |", "|---|---|---|"]
        for run, e in eq.items():
            bound = "" if e["bound"] == "=" else e["bound"] + " "
            lines.append(f"| {run} | {100 * accs[run]:.2f} | {bound}{e['images_per_class']:.1f} |")
        atomic_write_text(out / "real_curve.md", "\n".join(lines) + "\n")
        curve_figure(curve, accs, out / "real_curve.png")
        print("\n".join(lines))
    return {"curve": curve, "equivalent": eq}


def cli(argv: list[str] | None = None) -> dict:
    """Parse the config and flags, then run the stage."""
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--set", default=None, help="Synthetic-set folder (default: generate.out_dir).")
    parser.add_argument("--name", default=None, help="Name of the report folder (default: the set's folder name).")
    parser.add_argument("--no-cas", action="store_true", help="Skip the classifiers trained on the set alone.")
    parser.add_argument("--real-curve", action="store_true", help="Also the real-only curve and equivalent real images.")
    cfg, args = parse_args(parser, argv)
    if args.name is not None:  # the report folder: inside <run.output_dir>/evaluation unless absolute
        from mvc.core.paths import RunPaths, output_path

        output_path(RunPaths.of(cfg).evaluation, args.name, "", "--name")
    return main(cfg, args.set, args.name, cas=False if args.no_cas else None, real_curve=args.real_curve)


def console() -> None:
    """Entry point of the `mvc-evaluate` command."""
    run_cli(cli)


if __name__ == "__main__":
    console()
