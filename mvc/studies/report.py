"""The main job's report (run_pipeline.py): results.md from the files its stages wrote (accuracy per run, mean and
std over seeds, the optimizer steps and images of each run, whether the main set helps, the synthetic-set table,
stage wall times and figures), and its copy into the README's results section of a profile."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from mvc.core.config import Config
from mvc.core.paths import RunPaths
from mvc.core.utils import MVCError, atomic_copy, atomic_path, atomic_write_text
from mvc.studies.pipeline import (
    classifier_run_dir,
    extra_generators,
    long_budget,
    long_runs,
    recipe_configs,
    run_config,
    split_run,
)

README_BEGIN = "<!-- results:begin {profile} (written by run_pipeline.py --update-readme) -->"
README_END = "<!-- results:end {profile} -->"


def profile_key(cfg: Config) -> str:
    """The README section and docs/results/ folder of a run: the name of its output folder (tiny, small, ...),
    with '-generators' when the run compares more than one generator (so `make demo`'s section stays its own)."""
    return Path(cfg.run.output_dir).name + ("-generators" if len(cfg.pipeline.generators) > 1 else "")


#################################################################################
#                                  Results rows                                 #
#################################################################################

def _metric(metrics: dict, key: str) -> float:
    """Read a test metric of the last epoch from a classifier's metrics.json."""
    block = metrics.get("last", metrics)
    return float(block[key])


def result_row(rc: Config, run: str) -> dict:
    """One results row: mean and std over pipeline.seeds of accuracy and macro F1 of `run` under the recipe config
    `rc`, the optimizer steps (with the two-phase split) and images each run trained on, and its set's generator."""
    from mvc.classifier.outputs import synthetic_generator

    strategy, augment = split_run(run, rc.classifier.augment)
    ms = [json.loads(p.read_text()) for seed in rc.pipeline.seeds
          if (p := classifier_run_dir(rc, strategy, augment, seed) / "metrics.json").is_file()]
    accs = [100 * _metric(m, "accuracy") for m in ms]
    f1s = [100 * _metric(m, "f1_macro") for m in ms]
    return {"run": run, "backbone": rc.classifier.backbone, "strategy": strategy, "augment": augment,
            "generator": synthetic_generator(run_config(rc, strategy, augment, 0)),
            "n": len(accs), "acc_mean": float(np.mean(accs)) if accs else float("nan"),
            "acc_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
            "f1_mean": float(np.mean(f1s)) if f1s else float("nan"),
            "f1_std": float(np.std(f1s, ddof=1)) if len(f1s) > 1 else 0.0,
            "accs": accs, "steps": sorted({m.get("steps") for m in ms if m.get("steps") is not None}),
            "phase_steps": ms[0].get("phase_steps", {}) if ms else {},
            "images": float(np.mean([m["images_seen"] for m in ms])) if ms and all(
                "images_seen" in m for m in ms) else None}


def collect_results(cfg: Config) -> list[dict]:
    """One row per (recipe, generator, run) at the classifier's budget (`result_row`). The main set's rows (every
    run of pipeline.runs) come first, then those of each other generator (pipeline.generator_runs); `generator` is
    the set's method, None for a run that uses no synthetic image."""
    sets = [(cfg, cfg.pipeline.runs)] + [(gc, cfg.pipeline.generator_runs) for gc in extra_generators(cfg)]
    return [result_row(rc, run) for gc, runs in sets for rc in recipe_configs(gc) for run in runs]


def collect_long_results(cfg: Config) -> list[dict]:
    """The rows of pipeline.long_runs at the long budget ([] without long runs)."""
    return [result_row(rc, run) for lc, run in long_runs(cfg) for rc in recipe_configs(lc)]


#################################################################################
#                                   results.md                                  #
#################################################################################

def steps_cell(row: dict) -> str:
    """The optimizer steps of a run: '200', or '160 + 40' for the two phases."""
    if len(row["phase_steps"]) > 1:
        return " + ".join(str(v) for v in row["phase_steps"].values())
    return " / ".join(str(v) for v in row["steps"]) or "?"


def budget_sentence(rc: Config, rows: list[dict]) -> str:
    """The recipe's budget in words: the same optimizer steps for every run, and how two_phase splits them."""
    c = rc.classifier
    steps = {v for r in rows for v in r["steps"]}
    text = (f"{steps.pop()} optimizer steps for every run" if len(steps) == 1
            else "optimizer steps differ between runs (see the table)" if steps else "no finished run")
    split = next((r["phase_steps"] for r in rows if len(r["phase_steps"]) > 1), None)
    if split:
        p1, p2 = split.get("phase1", 0), split.get("phase2", 0)
        text += f" (two_phase: {p1} on real + synthetic, then {p2} on real only at {c.two_phase_lr_scale:g}x LR)"
    how = f"`{c.optimizer}` lr {c.lr:g}, `{c.scheduler}` schedule"
    return (f"Backbone `{c.backbone}` ({'pretrained' if c.pretrained else 'from scratch'}), {how}, batch "
            f"{c.batch_size}; {text}")


def set_cell(row: dict) -> str:
    """The synthetic set a row trained on: its generator, '-' for a run that uses none."""
    return row.get("generator") or "-"


def plot_accuracy(rows: list[dict], path: Path) -> None:
    """Bar chart of accuracy per run with std error bars and the individual seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 1, 3.2))
    x = np.arange(len(rows))
    ax.bar(x, [r["acc_mean"] for r in rows], yerr=[r["acc_std"] for r in rows], capsize=4, color="#8fb3d9")
    for i, r in enumerate(rows):
        ax.scatter([i] * len(r["accs"]), r["accs"], color="k", s=10, zorder=3)
    several = len({r.get("backbone") for r in rows}) > 1  # several recipes: name the backbone too
    sets = len({r.get("generator") for r in rows} - {None}) > 1  # several generators: name the set too
    labels = [r["run"] + (f" @{set_cell(r)}" if sets and r.get("generator") else "")
              + (f" ({r['backbone']})" if several else "") for r in rows]
    ax.set_xticks(x, labels, rotation=20, ha="right")
    ax.set_ylabel("test accuracy (%)")
    lo = min((min(r["accs"]) for r in rows if r["accs"]), default=0)
    ax.set_ylim(max(0, lo - 5), min(100, max((max(r["accs"]) for r in rows if r["accs"]), default=100) + 3))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def write_results(cfg: Config, times: dict) -> Path:
    """results.md: the table (mean +- std over seeds), stage wall times and figures."""
    from mvc.data.synthetic import count_images

    paths = RunPaths.of(cfg)
    figs = paths.figures
    figs.mkdir(parents=True, exist_ok=True)
    rows = collect_results(cfg)
    plot_accuracy(rows, figs / "accuracy.png")
    grids = sorted(paths.grids.glob("*.png"))
    if grids:
        atomic_copy(grids[0], figs / "samples.png")
    from mvc.data import describe_eval_split

    n_syn = count_images(paths.synthetic)
    n_real = next((json.loads(p.read_text()).get("n_real") for p in sorted(paths.classifier.glob("*/metrics.json"))),
                  "?")
    recipes = recipe_configs(cfg)
    sets = len(cfg.pipeline.generators) > 1  # several generators: a column says which set each row trained on
    lines = [
        f"# MVC results: {cfg.data.name}, "
        + (f"{cfg.data.k_per_class} labelled images per class" if cfg.data.k_per_class else "every labelled image"),
        "",
        f"{n_syn} synthetic images for {n_real} real ones; evaluated on {describe_eval_split(cfg.data)}"
        + (f" (a fixed class-balanced {cfg.classifier.test_limit} of it)" if cfg.classifier.test_limit else "")
        + f"; mean ± std over seeds {cfg.pipeline.seeds}; metrics of the last epoch. *steps*: the optimizer steps "
        "of each run; *images seen* counts every image a run trained on, repeats included "
        "(probabilistic adds synthetic images to each real batch, so it sees more images in the same steps)."
        + (f" *set*: the generator of the synthetic set a run trained on (pipeline.generators: "
           f"{', '.join(cfg.pipeline.generators)}; `-`: real images only); the synthetic-set count is the main set's."
           if sets else ""),
        "",
        machine_line(),
    ]
    long_rows = collect_long_results(cfg)
    for rc in recipes:
        mine = [r for r in rows if r["backbone"] == rc.classifier.backbone]
        lines += ["", budget_sentence(rc, mine) + ".", "", *accuracy_table(mine, sets)]
        mine_long = [r for r in long_rows if r["backbone"] == rc.classifier.backbone]
        if mine_long:
            lines += ["", f"The same recipe at {cfg.pipeline.long_factor}x the budget (pipeline.long_runs): "
                      + budget_sentence(long_budget(rc), mine_long) + ".", "", *accuracy_table(mine_long, sets)]
    lines += verdict_section(cfg, rows, long_rows)
    lines += synthetic_section(cfg, paths)
    lines += ["", "| stage | wall time |", "|---|---|"]
    for name, sec in times.items():
        lines.append(f"| {name} | {sec / 60:.1f} min |")
    lines.append(f"| total | {sum(times.values()) / 60:.1f} min |")
    lines += ["", "![accuracy per run](figures/accuracy.png)", ""]
    if grids:
        lines += ["Samples (each row: a real image, then coarse and fine variants):", "",
                  "![samples](figures/samples.png)", ""]
    atomic_write_text(paths.report, "\n".join(lines) + "\n")
    return paths.report


def accuracy_table(rows: list[dict], sets: bool) -> list[str]:
    """The markdown accuracy table of `rows` (a *set* column when several generators are compared)."""
    lines = ["| run |" + (" set |" if sets else "") + " strategy | augmentation | steps | images seen | "
             "accuracy (%) | macro F1 (%) | seeds |", "|---|---|---|---|---|---|---|---|" + ("---|" if sets else "")]
    for r in rows:
        images = f"{r['images']:.0f}" if r["images"] is not None else "?"
        lines.append(f"| {r['run']} |" + (f" {set_cell(r)} |" if sets else "")
                     + f" {r['strategy']} | {r['augment']} | {steps_cell(r)} | {images} "
                     f"| {r['acc_mean']:.2f} ± {r['acc_std']:.2f} | {r['f1_mean']:.2f} ± {r['f1_std']:.2f} "
                     f"| {r['n']} |")
    return lines


def compare_rows(a: dict, b: dict) -> str:
    """'x vs y (+d points, p = z)': the mean accuracies of rows a and b, their difference and Welch's t-test."""
    from scipy.stats import ttest_ind

    text = f"{a['acc_mean']:.2f} vs {b['acc_mean']:.2f} ({a['acc_mean'] - b['acc_mean']:+.2f} points"
    if min(len(a["accs"]), len(b["accs"])) >= 2 and (a["acc_std"] > 0 or b["acc_std"] > 0):
        text += f", p = {float(ttest_ind(a['accs'], b['accs'], equal_var=False).pvalue):.3f}"
    return text + ")"


def beats(a: dict, b: dict, alpha: float = 0.05) -> bool:
    """Whether row `a` is more accurate than `b` beyond the seed spread: higher mean and Welch's p < alpha."""
    from scipy.stats import ttest_ind

    if not (a["accs"] and b["accs"]) or a["acc_mean"] <= b["acc_mean"]:
        return False
    if min(len(a["accs"]), len(b["accs"])) < 2 or (a["acc_std"] == 0 and b["acc_std"] == 0):
        return False  # one seed (or no spread) cannot tell a difference from noise
    return float(ttest_ind(a["accs"], b["accs"], equal_var=False).pvalue) < alpha


def verdict_lines(rows: list[dict], main: str, budget: str) -> list[str]:
    """For each run on the main set: does it beat the best real-only run and the same run on every other set?"""
    real = [r for r in rows if r["generator"] is None and r["accs"]]
    ours = [r for r in rows if r["generator"] == main and r["accs"]]
    if not real or not ours:
        return []
    best_real = max(real, key=lambda r: r["acc_mean"])
    out = []
    for r in ours:
        rivals = [o for o in rows if o["generator"] not in (None, main) and o["run"] == r["run"] and o["accs"]]
        verdict = "yes" if beats(r, best_real) and all(beats(r, o) for o in rivals) else "no"
        parts = [f"vs {best_real['run']}: {compare_rows(r, best_real)}"]
        parts += [f"vs {o['generator']}: {compare_rows(r, o)}" for o in rivals]
        out.append(f"- {budget}, {r['run']} on the {main} set: **{verdict}**; " + "; ".join(parts) + ".")
    return out


def verdict_section(cfg: Config, rows: list[dict], long_rows: list[dict]) -> list[str]:
    """Does the main set help? Each of its runs against the best real-only run and the same run on each other
    generator's set, at the classifier's budget and at the long one; 'yes' only beyond the seed spread."""
    main = cfg.pipeline.generators[0]
    lines = verdict_lines(rows, main, "equal budget")
    if long_rows:
        lines += verdict_lines(long_rows, main, f"{cfg.pipeline.long_factor}x budget")
    if not lines:
        return []
    return ["", f"### Does the {main} set help?", "",
            f"Each run on the {main} set against the most accurate run on real images alone and against the same run "
            "on every other generator's set (same seeds, same budget): **yes** only when its mean accuracy is higher "
            "and Welch's t-test over the seeds gives p < 0.05.", "", *lines]


def machine_line() -> str:
    """The machine the report was written on: the GPU (name, count) or the CPU cores, and torch's version."""
    import os

    import torch

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        where = f"{torch.cuda.get_device_name(0)}" + (f" x{n}" if n > 1 else "") + f" (CUDA {torch.version.cuda})"
    else:
        where = "CPU only"
    return f"Machine: {where}, {os.cpu_count()} CPU cores, torch {torch.__version__}."


def set_label(method: str, filters: list[str] | None = None) -> str:
    """The synthetic-set table's name of a generator's set (and its curation filters)."""
    label = "MVC (`generate_mvc.py`)" if method == "mvc" else f"{method} (`generate.method={method}`)"
    return label + (f", curated: {', '.join(filters)}" if filters else "")


def evaluation_record(cfg: Config) -> tuple[Path, dict] | None:
    """The evaluation stage's folder and metrics.json of the set of cfg's generate.method (None before it ran)."""
    from mvc.data.synthetic import set_name

    paths = RunPaths.of(cfg)
    ev_dir = paths.evaluation / set_name(paths.synthetic)
    if not (ev_dir / "metrics.json").is_file():
        return None
    return ev_dir, json.loads((ev_dir / "metrics.json").read_text())


def synthetic_section(cfg: Config, paths: RunPaths) -> list[str]:
    """The synthetic-set table (from the evaluation stage's metrics.json: one row per generator of
    pipeline.generators that has one) and the main set's per-class figure."""
    from mvc.evaluation.evaluate import summary_row, table_markdown

    main = evaluation_record(cfg)
    if main is None:
        return []
    ev_dir, rec = main
    table = [(set_label(cfg.generate.method, cfg.curation.filters), summary_row(rec))]
    per_class = [(cfg.generate.method, rec)]
    for gc in extra_generators(cfg):
        if (other := evaluation_record(gc)) is not None:
            table.append((set_label(gc.generate.method, cfg.curation.filters), summary_row(other[1])))
            per_class.append((gc.generate.method, other[1]))
    if (ev_dir / "figure.png").is_file():
        atomic_copy(ev_dir / "figure.png", paths.figures / "synthetic_per_class.png")
    ref = rec["reference"]
    cas = rec.get("cas")
    return ["", "### The synthetic set", "",
            f"Judged by an evaluation-only reference classifier (`{ref['backbone']}`, trained on all "
            f"{ref['train_images']} training images, {100 * ref['test_accuracy']:.1f}% on the test split); it never "
            "trains, filters or selects anything. Label fidelity: share of images the reference assigns to their "
            "class; diversity: within-class mean pairwise distance, synthetic / real test images; FD-ref: Fréchet "
            "distance in the reference's features (not FID), beside the same for the labelled real images; novelty: "
            "cosine distance to the source image / to the nearest other labelled image"
            + (f"; CAS: `{cas['backbone']}` trained on the synthetic images alone, tested on real ones "
               f"(seeds {cas['seeds']})." if cas else "."), "",
            table_markdown(table).rstrip(), "", *per_class_fidelity(per_class), "",
            "![per-class fidelity and diversity](figures/synthetic_per_class.png)"]


def per_class_fidelity(records: list[tuple[str, dict]]) -> list[str]:
    """Label fidelity (%) per class of each set (rows) beside the reference's accuracy on real test images."""
    rec0 = records[0][1]
    classes = [c[:12] for c in rec0["classes"]]
    real = rec0.get("reference_accuracy_on_real_per_class")
    lines = ["Label fidelity per class (%):", "", "| set | " + " | ".join(classes) + " |",
             "|---|" + "---|" * len(classes)]
    for method, rec in records:
        lines.append(f"| {method} | " + " | ".join(f"{100 * v:.0f}" for v in rec["fidelity"]["per_class"]) + " |")
    if real:
        lines.append("| real test images (the reference's accuracy on them) | "
                     + " | ".join(f"{100 * v:.0f}" for v in real) + " |")
    return lines


#################################################################################
#                                     README                                    #
#################################################################################

def update_readme(report: Path, profile: str = "tiny", readme: Path = Path("README.md"),
                  docs: Path | None = None) -> None:
    """Copy the report and its figures into the README's results section of `profile`, verbatim (figures go to
    docs/results/<profile>/)."""
    text = readme.read_text()
    begin, end = README_BEGIN.format(profile=profile), README_END.format(profile=profile)
    if begin not in text or end not in text:
        raise MVCError(f"{readme} has no results markers for profile {profile!r}; add {begin!r} and {end!r}")
    docs = Path("docs/results") / profile if docs is None else docs
    docs.mkdir(parents=True, exist_ok=True)
    body = report.read_text()
    for fig in (report.parent / "figures").glob("*.png"):
        shutil.copyfile(fig, docs / fig.name)
    body = body.replace("](figures/", f"]({docs.as_posix()}/").replace("# MVC results", "### MVC results", 1)
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    atomic_write_text(readme, head + begin + "\n" + body + end + tail)
