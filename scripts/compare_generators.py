"""Every generator under one protocol (`make compare`): one table and one figure from the same subset, seeds and budget.

    .venv/bin/python scripts/compare_generators.py --config configs/tiny.yaml --update-readme

Runs the main job (`run_pipeline.py`) once per sampling mode (`none`, `clusters`), each time with every
generator of `--generators`, in `<run.output_dir>-compare/<mode>/`; every set is judged by the same evaluation
and trained on by the same classifier runs. Writes `compare.md`, `compare.json` and `figures/compare.png`;
`--update-readme` copies them into the README's `compare` section. Each run resumes. docs/scripts.md has more.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

import run_pipeline
from mvc.core.config import Config, build_parser, config_to_dict, make_config, parse_args, save_config
from mvc.core.utils import atomic_path, atomic_write_json, atomic_write_text, run_cli
from mvc.studies.pipeline import check_runs, generator_config
from mvc.studies.report import beats, collect_results, compare_rows, evaluation_record, update_readme

GENERATORS = ["mvc", "mvc_nomix", "txt2img", "img2img", "dreambooth", "textual_inversion"]
SAMPLING = ["none", "clusters"]


def mode_config(cfg: Config, out: Path, mode: str, generators: list[str], runs: list[str]) -> Config:
    """The pipeline config of one sampling mode: its own run folder, every generator, the given runs."""
    return make_config(config_to_dict(cfg), {"run.output_dir": str(out / mode), "sampling.method": mode,
                                             "pipeline.generators": generators, "pipeline.runs": runs})


def mode_rows(cfg: Config, mode: str) -> list[dict]:
    """One row per generator of a finished mode: its synthetic-set metrics and the accuracy of each generator run."""
    from mvc.evaluation.evaluate import summary_row

    results = collect_results(cfg)
    rows = []
    for method in cfg.pipeline.generators:
        gc = generator_config(cfg, method, main=method == cfg.pipeline.generators[0])
        rec = evaluation_record(gc)
        acc = {r["run"]: {"mean": r["acc_mean"], "std": r["acc_std"], "accs": r["accs"]}
               for r in results if r["generator"] == method and r["run"] in cfg.pipeline.generator_runs}
        rows.append({"generator": method, "sampling": mode, **(summary_row(rec[1]) if rec else {}), "accuracy": acc})
    return rows


def baseline_rows(cfg: Config, baselines: list[str]) -> list[dict]:
    """The real-only runs of the first mode (the same for every generator)."""
    return [{"run": r["run"], "mean": r["acc_mean"], "std": r["acc_std"], "accs": r["accs"]}
            for r in collect_results(cfg) if r["run"] in baselines]


def write_compare(out: Path, rows: list[dict], baselines: list[dict], runs: list[str], cfg: Config,
                  minutes: dict) -> Path:
    """compare.md (the table), compare.json and figures/compare.png."""
    ref = next((json.loads((p).read_text())["reference"] for p in sorted(out.glob("*/evaluation/*/metrics.json"))), None)
    pct = lambda v: "-" if v is None or not np.isfinite(v) else f"{100 * v:.1f}"  # noqa: E731
    head = ("| generator | sampling | images | label fidelity (%) | diversity ratio | FD-ref (real floor) | CAS (%) | "
            + " | ".join(f"{r} (%)" for r in runs) + " |")
    lines = [f"### Generators compared: {cfg.data.name}, {cfg.data.k_per_class} labelled images per class", "",
             "Every synthetic set judged by the same evaluation-only reference classifier"
             + (f" (`{ref['backbone']}`, {100 * ref['test_accuracy']:.1f}% on the test split)" if ref else "")
             + ", which never trains, filters or selects anything; accuracy: the same classifier recipe and step "
             f"budget for every run, mean ± std over seeds {cfg.pipeline.seeds}, on a fixed class-balanced "
             f"{cfg.classifier.test_limit or 'all'} test images. *sampling*: `none` uses every labelled image, "
             "`clusters` the clustering-based sampling of `sampling.*`.", "",
             head, "|---" * (7 + len(runs)) + "|"]
    for r in rows:
        if "fidelity" not in r:
            lines.append(f"| {r['generator']} | {r['sampling']} | (not run) |" + " |" * (5 + len(runs)))
            continue
        cas = f"{100 * r['cas_mean']:.1f} ± {100 * r['cas_std']:.1f}" if r.get("cas_mean") is not None else "-"
        accs = " | ".join(f"{a['mean']:.2f} ± {a['std']:.2f}" if (a := r["accuracy"].get(run)) and a["accs"] else "-"
                          for run in runs)
        lines.append(f"| {r['generator']} | {r['sampling']} | {r['images']} | {pct(r['fidelity'])} | "
                     f"{r['diversity_ratio']:.2f} | {r['fd']:.2f} ({r['fd_real']:.2f}) | {cas} | {accs} |")
    lines += ["", "Real images only (no synthetic set; the same recipe and budget):", "",
              "| run | accuracy (%) |", "|---|---|"]
    lines += [f"| {b['run']} | {b['mean']:.2f} ± {b['std']:.2f} |" for b in baselines]
    lines += ["", "| mode | wall time |", "|---|---|"] + [f"| {m} | {v:.1f} min |" for m, v in minutes.items()]
    lines += [f"| total | {sum(minutes.values()):.1f} min |", "", "![generators compared](figures/compare.png)", ""]
    (out / "figures").mkdir(parents=True, exist_ok=True)
    plot_compare(rows, baselines, runs, out / "figures" / "compare.png")
    atomic_write_json(out / "compare.json", {"rows": rows, "baselines": baselines, "minutes": minutes})
    atomic_write_text(out / "compare.md", "\n".join(lines) + "\n")
    return out / "compare.md"


def plot_compare(rows: list[dict], baselines: list[dict], runs: list[str], path: Path) -> None:
    """Top: label fidelity and CAS per set; bottom: accuracy of each generator run (std bars, seeds as dots),
    the real-only baselines as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "fidelity" in r]
    labels = [r["generator"] + (f"\n+{r['sampling']}" if r["sampling"] != "none" else "") for r in rows]
    x = np.arange(len(rows))
    fig, (a, b) = plt.subplots(2, 1, figsize=(max(7, 0.75 * len(rows)), 7.5), sharex=True)  # one column per set
    w = 0.38
    a.bar(x - w / 2, [100 * r["fidelity"] for r in rows], w, label="label fidelity", color="#8fb3d9")
    a.bar(x + w / 2, [100 * (r["cas_mean"] or 0) for r in rows], w, yerr=[100 * (r["cas_std"] or 0) for r in rows],
          capsize=3, label="CAS", color="#e0a96d")
    a.set_ylabel("%")
    a.set_title("the synthetic set")
    w = 0.8 / max(1, len(runs))
    for k, run in enumerate(runs):
        means = [r["accuracy"].get(run, {}).get("mean", np.nan) for r in rows]
        stds = [r["accuracy"].get(run, {}).get("std", 0) for r in rows]
        pos = x - 0.4 + w * (k + 0.5)
        b.bar(pos, means, w, yerr=stds, capsize=3, label=run)
        for p, r in zip(pos, rows):
            accs = r["accuracy"].get(run, {}).get("accs", [])
            b.scatter([p] * len(accs), accs, color="k", s=6, zorder=3)
    for base, style in zip(baselines, ("--", ":", "-.")):
        b.axhline(base["mean"], color="k", ls=style, lw=1, label=base["run"])
    accs = [v for r in rows for a_ in r["accuracy"].values() for v in a_["accs"]] + [bl["mean"] for bl in baselines]
    if accs:
        b.set_ylim(max(0, min(accs) - 5), min(100, max(accs) + 3))
    b.set_ylabel("test accuracy (%)")
    b.set_title("classifiers on real + synthetic")
    b.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    for ax in (a, b):
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def versus(a: dict, b: dict) -> str:
    """'yes, x vs y (+d points, p = z)' or 'no, ...': whether accuracy `a` beats `b` beyond the seed spread
    (`report.beats`) and by how much; both as `mode_rows` and `baseline_rows` give them (mean, std, accs)."""
    ra, rb = ({"accs": x["accs"], "acc_mean": x["mean"], "acc_std": x["std"]} for x in (a, b))
    return f"{'yes' if beats(ra, rb) else 'no'}, {compare_rows(ra, rb)}"


def run_study(cfg: Config, out: Path, name: str, labels: list[str], configs: list) -> dict[str, float]:
    """A study's modes: every config checked before the first stage runs, the study's config saved as
    `config-<name>.yaml`, then `run_modes` (wall minutes in `<name>_times.json`)."""
    for c in configs:
        check_runs(c)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / f"config-{name}.yaml")
    return run_modes(labels, configs, out / f"{name}_times.json")


def run_modes(labels: list[str], configs: list, times_path: Path) -> dict[str, float]:
    """The main job once per mode (each run resumes), adding each mode's wall minutes to `times_path`, which keeps
    them across reruns; returns the minutes per mode."""
    minutes = json.loads(times_path.read_text()) if times_path.is_file() else {}
    for mode, c in zip(labels, configs):
        t0 = time.perf_counter()
        run_pipeline.main(c)
        minutes[mode] = minutes.get(mode, 0.0) + (time.perf_counter() - t0) / 60
        atomic_write_json(times_path, minutes)
    return minutes


def cli(argv: list[str] | None = None) -> Path:
    parser = build_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--generators", nargs="+", default=GENERATORS, help="generators compared (generate.method)")
    parser.add_argument("--sampling", nargs="+", default=SAMPLING, choices=SAMPLING, help="sampling modes")
    parser.add_argument("--baselines", nargs="+", default=["real", "real+randaugment"],
                        help="real-only runs trained once, in the first mode")
    parser.add_argument("--update-readme", action="store_true", help="copy compare.md into README.md's compare section")
    cfg, args = parse_args(parser, argv)
    out = Path(cfg.run.output_dir + "-compare")
    runs = list(cfg.pipeline.generator_runs)
    configs = []
    for i, mode in enumerate(args.sampling):
        extra = list(args.baselines) if i == 0 else []
        configs.append(mode_config(cfg, out, mode, list(args.generators), extra + [r for r in runs if r not in extra]))
    minutes, rows = run_study(cfg, out, "compare", list(args.sampling), configs), []
    for mode, c in zip(args.sampling, configs):
        c = generator_config(c, c.pipeline.generators[0], main=True)
        rows += mode_rows(c, mode)
    base = generator_config(configs[0], configs[0].pipeline.generators[0], main=True)
    report = write_compare(out, rows, baseline_rows(base, list(args.baselines)), runs, cfg, minutes)
    print(report.read_text())
    if args.update_readme:
        update_readme(report, "compare")
    return report


if __name__ == "__main__":
    if not any(a == "--config" or a.startswith("--config=") for a in sys.argv[1:]):
        raise SystemExit("give --config, e.g. --config configs/tiny.yaml")
    run_cli(cli)
