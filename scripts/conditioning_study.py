"""The supplement's Fig. 4 under one protocol: MVC fine-tuned with each conditioning, judged and trained on alike.

    .venv/bin/python scripts/conditioning_study.py --config configs/tiny.yaml --update-readme

Runs the main job (`run_pipeline.py`) once per `train.conditioning` of `--conditionings`, each in
`<run.output_dir>-conditioning/<conditioning>/` (the tiny base and the reference are shared caches), with the same
pairs, budgets, seeds and judges. Image conditionings mix at the embedding stage (they have no token ids), the coarse
op swapping tokens in from a donor. Writes `conditioning.md`/`.json`, `figures/conditioning.png` (the table's
figures) and `figures/conditioning_images.png` (Fig. 4: the sources, then each variant's images of them);
`--update-readme` copies them into the README's `conditioning` section. Every run resumes. docs/conditioning.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import compare_generators as compare
import numpy as np

from mvc.core.config import Config, build_parser, config_to_dict, make_config, parse_args
from mvc.core.paths import RunPaths
from mvc.core.utils import atomic_path, atomic_write_json, atomic_write_text, image_grid, read_jsonl, run_cli
from mvc.diffusion.conditioning import CONDITIONINGS, IMAGE_CONDITIONINGS
from mvc.studies.pipeline import generator_config
from mvc.studies.report import update_readme

RUNS = ["concat", "two_phase", "probabilistic"]


def mode_config(cfg: Config, out: Path, conditioning: str, runs: list[str]) -> Config:
    """The pipeline config of one conditioning: its own run folder, MVC only, these classifier runs."""
    over = {"run.output_dir": str(out / conditioning), "train.conditioning": conditioning,
            "pipeline.generators": ["mvc"], "pipeline.runs": runs,
            "pipeline.generator_runs": [r for r in runs if r in RUNS] or RUNS}
    if conditioning in IMAGE_CONDITIONINGS:  # no token ids: coarse swaps image tokens in from a donor
        over.update({"mixing.coarse_stage": "embeds", "mixing.coarse_mode": "swap"})
    return make_config(config_to_dict(cfg), over)


def example_sources(configs: list[Config], n: int) -> list[tuple[int, str]]:
    """Up to `n` sources (one per class first) that every finished variant made an image of: (index, id)."""
    made = []
    for c in configs:
        recs = read_jsonl(RunPaths.of(c).synthetic / "metadata.jsonl")
        made.append({(r["source_index"], r["source_id"]): r["label"] for r in recs if r["variant"] == 0})
    common = set.intersection(*(set(m) for m in made)) if made else set()
    by_class: dict[int, list] = {}
    for key in sorted(common):
        by_class.setdefault(made[0][key], []).append(key)
    picks = [v[0] for _, v in sorted(by_class.items())]
    picks += [k for _, v in sorted(by_class.items()) for k in v[1:]]
    return picks[:n]


def draw_examples(configs: list[Config], names: list[str], path: Path, n: int = 10) -> bool:
    """Fig. 4: the first row the real sources, then one row per conditioning: its first image (variant 0) of each."""
    from PIL import Image, ImageDraw

    from mvc.data import load_splits

    picks = example_sources(configs, n)
    if not picks:
        return False
    labelled = load_splits(configs[0].data)[0]
    size = 64
    rows = [[labelled.load_image(i).convert("RGB").resize((size, size), Image.NEAREST) for i, _ in picks]]
    for c in configs:
        root = RunPaths.of(c).synthetic
        recs = {r["source_index"]: r["file"] for r in read_jsonl(root / "metadata.jsonl") if r["variant"] == 0}
        rows.append([Image.open(root / recs[i]).convert("RGB").resize((size, size), Image.NEAREST) for i, _ in picks])
    grid = image_grid(rows)
    canvas = Image.new("RGB", (grid.width + 110, grid.height), "white")
    canvas.paste(grid, (110, 0))
    draw = ImageDraw.Draw(canvas)
    for k, name in enumerate(["real source", *names]):
        draw.text((4, k * grid.height // len(rows) + size // 2 - 6), name, fill="black")
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return True


def write_study(out: Path, rows: list[dict], baselines: list[dict], runs: list[str], cfg: Config, minutes: dict,
                examples: bool) -> Path:
    """conditioning.md (the table), conditioning.json and the figures."""
    pct = lambda v: "-" if v is None or not np.isfinite(v) else f"{100 * v:.1f}"  # noqa: E731
    lines = [f"### Conditioning the fine-tuned model (supplement Fig. 4): {cfg.data.name}, "
             f"{cfg.data.k_per_class} labelled images per class", "",
             "MVC fine-tuned and sampled with each `train.conditioning`, all else equal (pairs, steps, mixing budget, "
             "seeds); every set judged by the evaluation-only reference (never a filter); accuracy: the same recipe and "
             f"step budget for every run, mean ± std over seeds {cfg.pipeline.seeds}. Image conditionings mix at the "
             "embedding stage, the coarse op swapping tokens in from a donor (they have no token ids).", "",
             "*novelty*: cosine distance in the reference's features from each synthetic image to its own source / "
             "to the nearest other labelled image (near 0 to the source: close to a copy of it).", "",
             "| conditioning | images | label fidelity (%) | diversity ratio | FD-ref (real floor) | novelty: to source / "
             "nearest other | CAS (%) | " + " | ".join(f"{r} (%)" for r in runs) + " |", "|---" * (7 + len(runs)) + "|"]
    for r in rows:
        if "fidelity" not in r:
            lines.append(f"| {r['generator']} | (not run) |" + " |" * (5 + len(runs)))
            continue
        cas = f"{100 * r['cas_mean']:.1f} ± {100 * r['cas_std']:.1f}" if r.get("cas_mean") is not None else "-"
        accs = " | ".join(f"{a['mean']:.2f} ± {a['std']:.2f}" if (a := r["accuracy"].get(run)) and a["accs"] else "-"
                          for run in runs)
        lines.append(f"| {r['generator']} | {r['images']} | {pct(r['fidelity'])} | {r['diversity_ratio']:.2f} | "
                     f"{r['fd']:.2f} ({r['fd_real']:.2f}) | {r['to_source']:.3f} / {r['to_nearest_other']:.3f} | {cas} | "
                     f"{accs} |")
    lines += ["", "Real images only (the same recipe and budget):", "", "| run | accuracy (%) |", "|---|---|"]
    lines += [f"| {b['run']} | {b['mean']:.2f} ± {b['std']:.2f} |" for b in baselines]
    lines += ["", *answer(rows, runs, baselines)]
    lines += ["", "| conditioning | wall time |", "|---|---|"] + [f"| {m} | {v:.1f} min |" for m, v in minutes.items()]
    lines += [f"| total | {sum(minutes.values()):.1f} min |", "", "![conditioning](figures/conditioning.png)", ""]
    if examples:
        lines += ["The sources (first row) and each conditioning's first image of them:", "",
                  "![conditioning examples](figures/conditioning_images.png)", ""]
    (out / "figures").mkdir(parents=True, exist_ok=True)
    compare.plot_compare(rows, baselines, runs, out / "figures" / "conditioning.png")
    atomic_write_json(out / "conditioning.json", {"rows": rows, "baselines": baselines, "minutes": minutes})
    atomic_write_text(out / "conditioning.md", "\n".join(lines) + "\n")
    return out / "conditioning.md"


def answer(rows: list[dict], runs: list[str], baselines: list[dict]) -> list[str]:
    """In words: which conditioning makes the most faithful set, and per run, does a variant beat the first
    conditioning (MVC's caption by default) and the best real-only run (Welch's t-test over the seeds, p < 0.05,
    as results.md's verdict)?"""
    done = [r for r in rows if "fidelity" in r]
    if len(done) < 2:
        return []
    first, pct = done[0], lambda r, k: f"{r['generator']} {100 * (r.get(k) or 0):.1f}%"  # noqa: E731
    out = [f"**Which conditioning?** Label fidelity: best {pct(max(done, key=lambda r: r['fidelity']), 'fidelity')}, "
           f"worst {pct(min(done, key=lambda r: r['fidelity']), 'fidelity')}; CAS: best "
           f"{pct(max(done, key=lambda r: r.get('cas_mean') or 0), 'cas_mean')}. Each run against the same run on "
           f"`{first['generator']}`'s set and against the best run on real images alone (*yes* only when the mean is "
           "higher and Welch's t-test over the seeds gives p < 0.05):", ""]
    best = max(baselines, key=lambda b: b["mean"]) if baselines else None
    for r in done:
        parts = []
        for run in runs:
            a, b = r["accuracy"].get(run), first["accuracy"].get(run)
            if not (a and a["accs"]):
                continue
            vs = []
            if r is not first and b and b["accs"]:
                vs.append(f"vs {first['generator']} {compare.versus(a, b)}")
            if best and best["accs"]:
                vs.append(f"vs {best['run']} {compare.versus(a, best)}")
            parts.append(f"{run}: " + "; ".join(vs))
        out.append(f"- {r['generator']}: " + (" | ".join(parts) if parts else "no classifier run") + ".")
    return out


def cli(argv: list[str] | None = None) -> Path:
    parser = build_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--conditionings", nargs="+", default=list(CONDITIONINGS), choices=CONDITIONINGS,
                        help="train.conditioning of each run (the first also trains the real-only baselines)")
    parser.add_argument("--runs", nargs="+", default=RUNS, help="classifier runs on each set")
    parser.add_argument("--baselines", nargs="+", default=["real", "real+randaugment"], help="real-only runs")
    parser.add_argument("--update-readme", action="store_true", help="copy conditioning.md into README.md's section")
    cfg, args = parse_args(parser, argv)
    out = Path(cfg.run.output_dir + "-conditioning")
    names, runs = list(args.conditionings), list(args.runs)
    configs = [mode_config(cfg, out, c, (list(args.baselines) if i == 0 else []) + runs) for i, c in enumerate(names)]
    minutes = compare.run_study(cfg, out, "conditioning", names, configs)
    rows = [{**r, "generator": name, "sampling": "none"} for name, c in zip(names, configs)
            for r in compare.mode_rows(generator_config(c, "mvc", main=True), name)]
    examples = draw_examples(configs, names, out / "figures" / "conditioning_images.png")
    base = generator_config(configs[0], "mvc", main=True)
    report = write_study(out, rows, compare.baseline_rows(base, list(args.baselines)), runs, cfg, minutes, examples)
    print(report.read_text())
    if args.update_readme:
        update_readme(report, "conditioning")
    return report


if __name__ == "__main__":
    if not any(a == "--config" or a.startswith("--config=") for a in sys.argv[1:]):
        raise SystemExit("give --config, e.g. --config configs/tiny.yaml")
    run_cli(cli)
