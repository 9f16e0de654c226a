"""The granularity ablation of Mixing Visual Concepts (the axis of the paper's Figure 5), measured.

Each *setting* changes one knob of the mixing from the unmixed baseline: coarse k (tokens shuffled or
swapped), at the 'tokens' or 'embeds' stage; the window coarse mixing may touch (the caption, the
whole prompt, or every position including padding); fine s (dimensions per slice) and m (tokens).
For every setting and seed, a small synthetic set (a few sources per class, a few variants each) is
generated with the fine-tuned model and measured by the evaluation-only reference classifier
(fidelity, diversity ratio, Fréchet distance, novelty), plus its *shift*: the mean pixel distance to
the unmixed image of the same source and seed (the diffusion noise is shared, so the shift is what
the mixing alone changes). A setting whose shift is below one grey level is marked a no-op.
Results: mean ± std over seeds, a table, metric-vs-granularity curves, TensorBoard, and with
`downstream` the accuracy of classifiers trained with a few chosen settings' full-size sets.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mvc.core.paths import RunPaths
from mvc.core.utils import MVCError, RunLogger, atomic_write_json, atomic_write_text, safe_name

log = logging.getLogger(__name__)

NOOP_SHIFT = 1.0  # mean |Δ| below one grey level (of 255): the mixing did not change the images


@dataclass(frozen=True)
class Setting:
    """One point of the sweep: a name, its axis and x value, and the mixing overrides it makes."""
    name: str
    axis: str  # "none", "coarse k (tokens, shuffle)", "window", "fine s", "fine m", ...
    x: Any
    mixing: dict = field(default_factory=dict)

    @property
    def noop_by_construction(self) -> str | None:
        """Why a setting cannot change anything, when that is known before running it."""
        m = self.mixing
        if m.get("ops") == ["coarse"] and m.get("coarse_mode", "shuffle") == "shuffle" and m.get("coarse_k") == 1:
            return "a shuffle of one token is the identity"
        return None


def sweep(ks: list[int], ss: list[int], ms: list[int], stages: list[str], modes: list[str],
          windows: list[Any], base_k: int, base_s: int, base_m: int) -> list[Setting]:
    """The settings: the baseline, coarse k per (stage, mode), windows for coarse, fine s, fine m."""
    out = [Setting("none", "none", 0, {"ops": ["none"]})]
    for stage in stages:
        for mode in modes:
            for k in ks:
                out.append(Setting(f"coarse {mode} k={k} {stage}", f"coarse k ({stage}, {mode})", k,
                                   {"ops": ["coarse"], "coarse_k": k, "coarse_stage": stage, "coarse_mode": mode}))
    for w in windows:
        label = w if isinstance(w, str) else f"[{w[0]}, {w[1]})"
        out.append(Setting(f"coarse shuffle k={base_k} window {label}", "window", label,
                           {"ops": ["coarse"], "coarse_k": base_k, "coarse_stage": "tokens", "coarse_mode": "shuffle",
                            "window": w}))
    for s in ss:
        out.append(Setting(f"fine s={s} m={base_m}", "fine s", s, {"ops": ["fine"], "fine_s": s, "fine_m": base_m}))
    for m in ms:
        out.append(Setting(f"fine m={m} s={base_s}", "fine m", m, {"ops": ["fine"], "fine_m": m, "fine_s": base_s}))
    return out


def small_subset(labelled: Any, sources_per_class: int) -> Any:
    """The first `sources_per_class` labelled images of each class (every class keeps >= 2 for donors)."""
    idx = [i for c in range(len(labelled.classes)) for i in np.flatnonzero(labelled.targets == c)[:sources_per_class]]
    return labelled.subset(np.sort(np.asarray(idx, dtype=np.int64)))


def setting_config(cfg: Any, setting: Setting, out: Path, seed: int, per_class: int) -> Any:
    """The config that generates one (setting, seed) set into `out`."""
    c = copy.deepcopy(cfg)
    c.run.seed = int(seed)
    c.mixing = dataclasses.replace(c.mixing, **setting.mixing)
    c.generate = dataclasses.replace(c.generate, method="mvc", out_dir=str(out),  # an ablation of MVC's mixing
                                     grid_dir=str(out.parent / f"{out.name}_grids"), per_class=per_class,
                                     multiplier=None, grid_sources=2)
    return c


def pixel_shift(a_dir: Path, b_dir: Path, files: list[str]) -> float:
    """Mean absolute pixel difference (0-255) between the same files of two sets."""
    from PIL import Image

    diffs = [np.abs(np.asarray(Image.open(a_dir / f).convert("RGB"), np.int16)
                    - np.asarray(Image.open(b_dir / f).convert("RGB"), np.int16)).mean() for f in files]
    return float(np.mean(diffs)) if diffs else float("nan")


def effective(records: list[dict], key: str) -> float | None:
    """Mean of op_params[key] (coarse_k or fine_m after fitting to short windows) over a set's records."""
    vals = [r["op_params"][key] for r in records if key in r.get("op_params", {})]
    return float(np.mean(vals)) if vals else None


def run_ablation(cfg: Any, accelerator: Any, settings: list[Setting], seeds: list[int], sources_per_class: int,
                 variants: int, out: Path | None = None, progress: bool = True) -> list[dict]:
    """Generate and measure every (setting, seed); returns one row per setting (mean ± std over seeds)."""
    from tqdm.auto import tqdm

    from mvc.core.distributed import resolve_dtype
    from mvc.core.seeds import numpy_rng
    from mvc.core.utils import read_jsonl
    from mvc.data import load_splits
    from mvc.data.captions import load_captions
    from mvc.data.synthetic import load_synthetic_set
    from mvc.evaluation.evaluate import load_reference, real_subset, source_rows
    from mvc.evaluation.metrics import (
        diversity_ratio,
        frechet_distance,
        label_fidelity,
        novelty,
        within_class_diversity,
    )
    from mvc.evaluation.reference import features_and_probs
    from mvc.generation.generate import generate_synthetic
    from mvc.generation.generators import load_finetuned

    paths = RunPaths.of(cfg)
    # absolute: generation takes a relative generate.out_dir as relative to the run folder
    out = Path(out or paths.root / "ablation_mixing").resolve()
    if settings[0].axis != "none":
        raise MVCError("the first setting must be the unmixed baseline ('none'): shifts are measured against it")
    labelled_all, _pool, test = load_splits(cfg.data)
    labelled = small_subset(labelled_all, sources_per_class)
    if (np.bincount(labelled.targets, minlength=len(labelled.classes)) < 2).any():
        raise MVCError("the ablation needs at least 2 labelled images per class (donors)")
    captions = load_captions(cfg, labelled_all, progress=False, device=accelerator.device)
    pipe = load_finetuned(paths.final, cfg.generate.scheduler, accelerator.device,
                              dtype=resolve_dtype(cfg.generate.dtype, accelerator.device))
    per_class = sources_per_class * variants

    # 1. every (setting, seed) set (a bad setting fails here, before the reference is trained)
    t0 = time.time()
    runs = [(st, seed) for st in settings if st.noop_by_construction is None for seed in seeds]
    for st, seed in tqdm(runs, desc="ablation: generate", disable=not progress):
        generate_synthetic(setting_config(cfg, st, set_path(out, st, seed), seed, per_class), labelled=labelled,
                           captions=captions, pipe=pipe, progress=False)

    # 2. measure them with the reference (real and labelled features computed once)
    ref = load_reference(cfg, accelerator, progress)
    ev, C = cfg.evaluate, len(labelled.classes)
    real = real_subset(cfg, test)
    f_real, _ = features_and_probs(ref, real, ev.batch_size, accelerator.device)
    f_lab, _ = features_and_probs(ref, labelled_all, ev.batch_size, accelerator.device)
    div_real = within_class_diversity(f_real, real.targets, C, ev.max_per_class, numpy_rng(0, "evaluate", 3))
    rows, per_seed = [], {}
    for st in tqdm(settings, desc="ablation: measure", disable=not progress):
        measures = []
        for seed in (seeds if st.noop_by_construction is None else []):
            set_dir = set_path(out, st, seed)
            syn = load_synthetic_set(set_dir, labelled.classes)
            f_syn, p_syn = features_and_probs(ref, syn, ev.batch_size, accelerator.device)
            recs = read_jsonl(set_dir / "metadata.jsonl")
            m = {"fidelity": label_fidelity(p_syn.argmax(1), syn.targets, C)["overall"],
                 "diversity_ratio": diversity_ratio(within_class_diversity(
                     f_syn, syn.targets, C, ev.max_per_class, numpy_rng(0, "evaluate", 3)), div_real)["ratio"],
                 "fd": frechet_distance(f_syn, f_real),
                 "to_source": novelty(f_syn, source_rows(set_dir, labelled.classes, labelled_all, syn), f_lab)[
                     "to_source"],
                 "shift": (pixel_shift(set_dir, set_path(out, settings[0], seed), [r["file"] for r in recs])
                           if st is not settings[0] else 0.0),
                 "effective_k": effective(recs, "coarse_k"), "effective_m": effective(recs, "fine_m")}
            measures.append(m)
            per_seed.setdefault(st.name, {})[seed] = m
        rows.append(summarise(st, measures))
    if accelerator.is_main_process:
        write_outputs(rows, per_seed, out, cfg, seeds, sources_per_class, variants, time.time() - t0)
    return rows


def set_path(out: Path, st: Setting, seed: int) -> Path:
    """Where the set of one (setting, seed) is generated."""
    return out / "sets" / safe_name(st.name) / f"seed{seed}"


def summarise(st: Setting, measures: list[dict]) -> dict:
    """mean ± std (ddof=1) of each metric over seeds, the effective k/m, and the no-op mark."""
    from mvc.classifier.metrics import sample_std

    row = {"setting": st.name, "axis": st.axis, "x": st.x, "seeds": len(measures),
           "noop": st.noop_by_construction}
    for key in ("fidelity", "diversity_ratio", "fd", "to_source", "shift"):
        vals = [m[key] for m in measures if m.get(key) is not None]
        row[key] = {"mean": float(np.mean(vals)), "std": sample_std(vals)} if vals else None
    for key in ("effective_k", "effective_m"):
        vals = [m[key] for m in measures if m.get(key) is not None]
        row[key] = float(np.mean(vals)) if vals else None
    if row["noop"] is None and st.name != "none" and row["shift"] and row["shift"]["mean"] < NOOP_SHIFT:
        row["noop"] = f"images unchanged (mean shift {row['shift']['mean']:.2f} grey levels)"
    return row


def _ms(v: dict | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if not v else f"{scale * v['mean']:.{digits}f} ± {scale * v['std']:.{digits}f}"


def write_outputs(rows: list[dict], per_seed: dict, out: Path, cfg: Any, seeds: list[int], sources: int,
                  variants: int, seconds: float) -> None:
    """ablation.json, ablation.md (the table), ablation.png (curves) and TensorBoard scalars."""
    atomic_write_json(out / "ablation.json", {"rows": rows, "per_seed": per_seed, "seeds": seeds,
                                              "sources_per_class": sources, "variants": variants,
                                              "seconds": round(seconds, 1), "mixing_base": dataclasses.asdict(cfg.mixing)})
    lines = [f"# Mixing granularity ablation ({cfg.data.name})", "",
             f"{sources} sources per class x {variants} variants per setting and seed; seeds {seeds}; "
             f"{cfg.generate.num_inference_steps} steps, guidance {cfg.generate.guidance_scale} / image "
             f"{cfg.generate.image_guidance_scale}. Metrics judged by the evaluation-only reference classifier "
             "(never used to train, filter or select); mean ± std over seeds. shift: mean pixel difference "
             "(0-255) to the unmixed image of the same source and seed.", "",
             "| setting | effective k / m | label fidelity (%) | diversity ratio | FD-ref | to source | shift | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        eff = " / ".join("-" if r[k] is None else f"{r[k]:.2f}" for k in ("effective_k", "effective_m"))
        lines.append(f"| {r['setting']} | {eff} | {_ms(r['fidelity'], 100, 1)} | {_ms(r['diversity_ratio'])} | "
                     f"{_ms(r['fd'])} | {_ms(r['to_source'], 1, 3)} | {_ms(r['shift'])} | {r['noop'] or ''} |")
    atomic_write_text(out / "ablation.md", "\n".join(lines) + "\n")
    fig = curves(rows)
    logger = RunLogger(out)
    try:
        logger.config(dataclasses.asdict(cfg))
        for i, r in enumerate(rows):
            logger.scalars(i, {k: r[k]["mean"] for k in ("fidelity", "diversity_ratio", "fd", "to_source", "shift")
                               if r.get(k)}, prefix=f"ablation/{safe_name(r['axis'])}/")
        logger.figure("ablation/curves", fig, 0, path=out / "ablation.png")
    finally:
        logger.close()
        import matplotlib.pyplot as plt

        plt.close(fig)


def curves(rows: list[dict]):
    """Metric (rows of panels) vs granularity (columns: one per axis), mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next((r for r in rows if r["axis"] == "none"), None)
    axes = [a for a in dict.fromkeys(r["axis"] for r in rows) if a != "none"]
    metrics = [("fidelity", "label fidelity (%)", 100), ("diversity_ratio", "diversity ratio", 1),
               ("fd", "FD-ref", 1), ("to_source", "distance to source", 1)]
    fig, grid = plt.subplots(len(metrics), len(axes), figsize=(2.6 * len(axes), 2.1 * len(metrics)), squeeze=False)
    for j, axis in enumerate(axes):
        pts = [r for r in rows if r["axis"] == axis]
        xs = list(range(len(pts))) if any(isinstance(r["x"], str) for r in pts) else [r["x"] for r in pts]
        for i, (key, label, scale) in enumerate(metrics):
            ax = grid[i][j]
            ok = [(x, r) for x, r in zip(xs, pts) if r.get(key)]
            if ok:
                ax.errorbar([x for x, _ in ok], [scale * r[key]["mean"] for _, r in ok],
                            yerr=[scale * r[key]["std"] for _, r in ok], marker="o", ms=3, capsize=2)
                for x, r in ok:
                    if r["noop"]:
                        ax.scatter([x], [scale * r[key]["mean"]], marker="x", color="r", zorder=3)
            if base and base.get(key):
                ax.axhline(scale * base[key]["mean"], ls="--", lw=0.8, color="gray")
            if isinstance(pts[0]["x"], str):
                ax.set_xticks(xs, [str(r["x"]) for r in pts], rotation=30, fontsize=6)
            elif all(isinstance(x, (int, float)) and x > 0 for x in xs) and max(xs) / min(xs) >= 8:
                ax.set_xscale("log", base=2)
            if i == 0:
                ax.set_title(axis, fontsize=8)
            if j == 0:
                ax.set_ylabel(label, fontsize=8)
            ax.tick_params(labelsize=6)
            ax.grid(alpha=0.3)
    fig.suptitle("mixing granularity (dashed: unmixed; x: no-op)", fontsize=9)
    fig.tight_layout()
    return fig


#################################################################################
#                                   Downstream                                  #
#################################################################################

def downstream(cfg: Any, accelerator: Any, settings: list[Setting], strategy: str, out: Path) -> list[dict]:
    """For a few settings: a full-size synthetic set (generate.multiplier) and classifiers trained with it
    (`strategy`, pipeline.seeds, the classifier.* budget): accuracy mean ± std per setting."""
    from mvc.classifier.metrics import sample_std
    from mvc.classifier.train import run_all
    from mvc.generation.generate import generate_synthetic

    rows, out = [], Path(out).resolve()
    for st in settings:
        c = copy.deepcopy(cfg)
        root = out / "downstream" / safe_name(st.name)
        c.run.output_dir = str(root)
        c.mixing = dataclasses.replace(c.mixing, **st.mixing)
        c.generate = dataclasses.replace(c.generate, method="mvc", model_dir=str(RunPaths.of(cfg).final), out_dir=None,
                                         grid_dir=None)
        c.classifier = dataclasses.replace(c.classifier, strategy=strategy, seeds=list(cfg.pipeline.seeds),
                                           results_csv=None, synthetic_dir=None)
        generate_synthetic(c, device=accelerator.device, progress=accelerator.is_main_process)
        accs = [r["last"]["accuracy"] for r in run_all(c, accelerator)]
        rows.append({"setting": st.name, "strategy": strategy, "accuracy": {"mean": float(np.mean(accs)),
                                                                              "std": sample_std(accs)}, "values": accs})
    if accelerator.is_main_process:
        atomic_write_json(out / "downstream.json", rows)
        lines = ["| setting | strategy | accuracy (%) |", "|---|---|---|"] + [
            f"| {r['setting']} | {r['strategy']} | {_ms(r['accuracy'], 100)} |" for r in rows]
        atomic_write_text(out / "downstream.md", "\n".join(lines) + "\n")
    return rows


def read_rows(out: Path) -> list[dict]:
    """The rows of a finished ablation (ablation.json)."""
    p = out / "ablation.json"
    if not p.is_file():
        raise MVCError(f"no ablation results in {out}; run scripts/ablate_mixing.py first")
    return json.loads(p.read_text())["rows"]

