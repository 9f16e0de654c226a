"""Curation at equal budgets: every generator without and with curation, and which filter does what.

    .venv/bin/python scripts/curation_study.py --config configs/tiny.yaml --update-readme

Runs the main job (`run_pipeline.py`) in `<run.output_dir>-curation/` once per curation mode: `none`, `--filters`
for every generator of `--generators`, then each filter of `--ablation` for the first generator; every curated
set has the planned number of images per class. Writes `curation.md`, `curation.json` and
`figures/curation.png`; `--update-readme` copies them into the README's `curation` section. Every run resumes.
docs/scripts.md has more.
"""

from __future__ import annotations

import sys
from pathlib import Path

import compare_generators as compare
import numpy as np

from mvc.core.config import Config, build_parser, config_to_dict, make_config, parse_args
from mvc.core.utils import atomic_write_json, atomic_write_text, run_cli
from mvc.studies.pipeline import generator_config
from mvc.studies.report import update_readme

GENERATORS = ["mvc", "mvc_nomix", "img2img", "textual_inversion"]
RUNS = ["concat", "two_phase", "probabilistic"]


def mode_config(cfg: Config, out: Path, filters: list[str], generators: list[str], runs: list[str]) -> Config:
    """The pipeline config of one curation mode: the shared run folder, these filters, generators and runs."""
    return make_config(config_to_dict(cfg), {"run.output_dir": str(out), "curation.filters": filters,
                                             "pipeline.generators": generators, "pipeline.runs": runs,
                                             "pipeline.generator_runs": [r for r in runs if r in RUNS] or RUNS})


def label(filters: list[str]) -> str:
    """A mode's name in the table: 'none', or its filters."""
    return " + ".join(filters) if filters else "none"


def kept_counts(cfg: Config, method: str) -> tuple[int, int] | None:
    """(images kept, images dropped) of a generator's set under cfg's curation (None before it exists)."""
    from mvc.core.paths import RunPaths
    from mvc.core.utils import read_jsonl

    gc = generator_config(cfg, method, main=method == cfg.pipeline.generators[0])
    root = RunPaths.of(gc).synthetic
    if not (root / "metadata.jsonl").is_file():
        return None
    return len(read_jsonl(root / "metadata.jsonl")), len(read_jsonl(root / "rejected.jsonl"))


def write_study(out: Path, rows: list[dict], baselines: list[dict], runs: list[str], cfg: Config,
                minutes: dict) -> Path:
    """curation.md (the table, the answer), curation.json and figures/curation.png."""
    pct = lambda v: "-" if v is None or not np.isfinite(v) else f"{100 * v:.1f}"  # noqa: E731
    lines = [f"### Curation at equal budgets: {cfg.data.name}, {cfg.data.k_per_class} labelled images per class", "",
             "Each set judged by the evaluation-only reference (never a filter); curated sets have the planned count "
             "per class (*candidates*: images made, kept + dropped). Accuracy: the same recipe and step budget for "
             f"every run, mean ± std over seeds {cfg.pipeline.seeds}.", "",
             "| generator | curation | images (candidates) | label fidelity (%) | diversity ratio | FD-ref (real floor) "
             "| CAS (%) | " + " | ".join(f"{r} (%)" for r in runs) + " |", "|---" * (7 + len(runs)) + "|"]
    for r in rows:
        if "fidelity" not in r:
            lines.append(f"| {r['generator']} | {r['sampling']} | (not run) |" + " |" * (4 + len(runs)))
            continue
        cas = f"{100 * r['cas_mean']:.1f} ± {100 * r['cas_std']:.1f}" if r.get("cas_mean") is not None else "-"
        accs = " | ".join(f"{a['mean']:.2f} ± {a['std']:.2f}" if (a := r["accuracy"].get(run)) and a["accs"] else "-"
                          for run in runs)
        made = f"{r['images']} ({r['candidates']})" if r.get("candidates") else str(r["images"])
        lines.append(f"| {r['generator']} | {r['sampling']} | {made} | {pct(r['fidelity'])} | "
                     f"{r['diversity_ratio']:.2f} | {r['fd']:.2f} ({r['fd_real']:.2f}) | {cas} | {accs} |")
    lines += ["", "Real images only (the same recipe and budget):", "", "| run | accuracy (%) |", "|---|---|"]
    lines += [f"| {b['run']} | {b['mean']:.2f} ± {b['std']:.2f} |" for b in baselines]
    lines += ["", *answer(rows, baselines, runs)]
    lines += ["", "| mode | wall time |", "|---|---|"] + [f"| {m} | {v:.1f} min |" for m, v in minutes.items()]
    lines += [f"| total | {sum(minutes.values()):.1f} min |", "", "![curation](figures/curation.png)", ""]
    (out / "figures").mkdir(parents=True, exist_ok=True)
    compare.plot_compare(rows, baselines, runs, out / "figures" / "curation.png")
    atomic_write_json(out / "curation.json", {"rows": rows, "baselines": baselines, "minutes": minutes})
    atomic_write_text(out / "curation.md", "\n".join(lines) + "\n")
    return out / "curation.md"


def answer(rows: list[dict], baselines: list[dict], runs: list[str]) -> list[str]:
    """In words, per generator run: does curation beat the uncurated set, and the best real-only run (Welch's
    t-test over the seeds, p < 0.05, as results.md's verdict)?"""
    best = max(baselines, key=lambda b: b["mean"]) if baselines else None
    out = ["**Does curation help?** (*yes* only when the mean is higher and Welch's t-test over the seeds gives "
           "p < 0.05)", ""]
    for r in rows:
        if r["sampling"] == "none" or "fidelity" not in r:
            continue
        plain = next((p for p in rows if p["generator"] == r["generator"] and p["sampling"] == "none"), None)
        for run in runs:
            a = r["accuracy"].get(run)
            if not a or not a["accs"]:
                continue
            parts = []
            if plain and plain["accuracy"].get(run, {}).get("accs"):
                parts.append(f"vs uncurated: {compare.versus(a, plain['accuracy'][run])}")
            if best:
                parts.append(f"vs {best['run']}: {compare.versus(a, best)}")
            out.append(f"- {r['generator']}, {r['sampling']}, {run}: " + "; ".join(parts) + ".")
    return out


def cli(argv: list[str] | None = None) -> Path:
    parser = build_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--generators", nargs="+", default=GENERATORS, help="generators curated (generate.method)")
    parser.add_argument("--filters", nargs="+", default=["wrong", "easy"], help="curation.filters of the main mode")
    parser.add_argument("--ablation", nargs="*", default=["wrong", "easy"],
                        help="each filter alone, on the first generator")
    parser.add_argument("--runs", nargs="+", default=RUNS, help="classifier runs on each set")
    parser.add_argument("--baselines", nargs="+", default=["real", "real+randaugment"], help="real-only runs")
    parser.add_argument("--update-readme", action="store_true", help="copy curation.md into README.md's section")
    cfg, args = parse_args(parser, argv)
    out = Path(cfg.run.output_dir + "-curation")
    gens, runs = list(args.generators), list(args.runs)
    modes = [([], gens, list(args.baselines) + runs), (list(args.filters), gens, runs)]
    modes += [([f], gens[:1], runs) for f in args.ablation if [f] != list(args.filters)]
    configs = [mode_config(cfg, out, f, g, r) for f, g, r in modes]
    minutes = compare.run_study(cfg, out, "curation", [label(f) for f, _, _ in modes], configs)
    rows = []
    for (filters, gs, _), c in zip(modes, configs):
        c = generator_config(c, c.pipeline.generators[0], main=True)
        for r in compare.mode_rows(c, label(filters)):
            counts = kept_counts(c, r["generator"])
            rows.append({**r, "candidates": sum(counts) if counts and filters else None})
    base = generator_config(configs[0], configs[0].pipeline.generators[0], main=True)
    report = write_study(out, rows, compare.baseline_rows(base, list(args.baselines)), runs, cfg, minutes)
    print(report.read_text())
    if args.update_readme:
        update_readme(report, "curation")
    return report


if __name__ == "__main__":
    if not any(a == "--config" or a.startswith("--config=") for a in sys.argv[1:]):
        raise SystemExit("give --config, e.g. --config configs/tiny.yaml")
    run_cli(cli)
