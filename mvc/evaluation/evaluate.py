"""Evaluate a synthetic set: fidelity, diversity, distribution distance, novelty and CAS, in one report.

All measurements but CAS are made in the feature space of the evaluation-only reference classifier
(`mvc.evaluation.reference`): trained on the dataset's full training split, it judges, and nothing else reads
it. Outputs go to `<run.output_dir>/evaluation/<set>/`: metrics.json, report.md, a figure (per-class fidelity
and diversity) and TensorBoard scalars. docs/evaluation.md defines each measure.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from mvc.core import seeds
from mvc.core.paths import RunPaths
from mvc.core.utils import MVCError, RunLogger, atomic_path, atomic_write_json, atomic_write_text
from mvc.evaluation.metrics import (
    diversity_ratio,
    equivalent_real,
    frechet_distance,
    label_fidelity,
    novelty,
    within_class_diversity,
)
from mvc.evaluation.reference import Reference, features_and_probs, get_reference

log = logging.getLogger(__name__)

NOTE = ("Judged by an evaluation-only reference classifier trained on the dataset's full training split; "
        "it never trains, filters or selects anything.")


def reference_splits(cfg: Any) -> tuple[Any, Any]:
    """(full training split, official test split) of the config's dataset: what the reference learns and is measured on."""
    import inspect

    from mvc.data import DATASETS, build_dataset

    kw = {}
    if "test_fraction" in inspect.signature(DATASETS.get(cfg.data.name)).parameters:
        kw["test_fraction"] = cfg.data.test_fraction
    return build_dataset(cfg.data.name, cfg.data.root, "train", **kw), build_dataset(cfg.data.name, cfg.data.root,
                                                                                      "test", **kw)


def load_reference(cfg: Any, accelerator: Any, progress: bool = True) -> Reference:
    """The dataset's reference (trained and cached on first use)."""
    train, test = reference_splits(cfg)
    return get_reference(cfg.evaluate, train, test, accelerator, progress)


def real_subset(cfg: Any, test: Any) -> Any:
    """The fixed class-balanced subset of real test images that synthetic sets are compared with."""
    from mvc.classifier.data import stratified_take

    limit = cfg.evaluate.real_limit
    if limit is None or len(test) <= limit:
        return test
    return test.subset(stratified_take(test.targets, limit, seeds.numpy_rng(cfg.data.subset_seed,
                                                                              "classifier.test_subset")))


#################################################################################
#                                 One synthetic set                             #
#################################################################################

def measure(ref: Reference, syn: Any, sources: np.ndarray, labelled: Any, real: Any, ev: Any,
            device: Any = None, progress: bool = False) -> dict:
    """Every reference-based metric of one set (no file is written): pure apart from the feature pass."""
    C = len(labelled.classes)
    f_syn, p_syn = features_and_probs(ref, syn, ev.batch_size, device, progress)
    f_real, p_real = features_and_probs(ref, real, ev.batch_size, device, progress)
    f_lab, _ = features_and_probs(ref, labelled, ev.batch_size, device, progress)
    rng = seeds.numpy_rng(0, "evaluate", 3)
    div_syn = within_class_diversity(f_syn, syn.targets, C, ev.max_per_class, rng)
    div_real = within_class_diversity(f_real, real.targets, C, ev.max_per_class, rng)
    nov = novelty(f_syn, sources, f_lab)
    return {
        "images": len(syn),
        "fidelity": label_fidelity(p_syn.argmax(1), syn.targets, C),
        "reference_accuracy_on_real": label_fidelity(p_real.argmax(1), real.targets, C)["overall"],
        "reference_accuracy_on_real_per_class": label_fidelity(p_real.argmax(1), real.targets, C)["per_class"],
        "diversity": {**diversity_ratio(div_syn, div_real), "synthetic_per_class": div_syn, "real_per_class": div_real},
        "frechet": {"synthetic_vs_test": frechet_distance(f_syn, f_real),
                    "labelled_vs_test": frechet_distance(f_lab, f_real), "feature_dim": int(f_syn.shape[1]),
                    "n_synthetic": len(syn), "n_test": len(real), "n_labelled": len(labelled)},
        "novelty": {k: v for k, v in nov.items() if k != "per_image_to_source"},
        "confidence": float(p_syn[np.arange(len(syn)), syn.targets].mean()) if len(syn) else float("nan"),
    }


def source_rows(set_dir: Path, classes: list[str], labelled: Any, syn: Any) -> np.ndarray:
    """Row of each synthetic image's source in `labelled` (-1 when it has none or it is not labelled)."""
    from mvc.data.synthetic import read_records

    by_file = {r["file_name"]: r.get("source_id") for r in read_records(set_dir, classes)}
    pos = {str(i): n for n, i in enumerate(labelled.ids)}
    return np.array([pos.get(str(by_file.get(f)), -1) for f in syn.ids], dtype=np.int64)


def evaluate_set(cfg: Any, set_dir: str | Path, accelerator: Any, *, name: str | None = None, splits=None,
                 ref: Reference | None = None, cas: bool | None = None, progress: bool = True) -> dict:
    """Measure the synthetic set at `set_dir`, train its CAS classifiers, and write the report."""
    from mvc.data import load_splits
    from mvc.data.synthetic import check_provenance, load_synthetic_set, set_name

    t0 = time.time()
    set_dir = Path(set_dir)
    ev, paths = cfg.evaluate, RunPaths.of(cfg)
    labelled, _pool, test = splits if splits is not None else load_splits(cfg.data)
    classes = list(labelled.classes)
    check_provenance(set_dir, labelled, cfg.data.root)  # a set of another run, or real images, is refused
    syn = load_synthetic_set(set_dir, classes)
    if len(syn) == 0:
        raise MVCError(f"no synthetic images in {set_dir}; generate them first (generate_mvc.py)")
    ref = ref or load_reference(cfg, accelerator, progress)
    if list(ref.classes) != classes:
        raise MVCError(f"the reference in {ref.folder} was trained on other classes; delete it or set evaluate.cache_dir")
    name = name or set_name(set_dir)
    out = paths.evaluation / name
    from mvc.data.synthetic import set_fingerprint

    record = {"set": str(set_dir), "name": name, "set_fingerprint": set_fingerprint(set_dir),
              "dataset": cfg.data.name, "classes": classes, "note": NOTE,
              "reference": {"backbone": ref.meta.backbone, "folder": str(ref.folder),
                            "test_accuracy": ref.info.get("test_accuracy"), "train_images": ref.info.get("train_images")},
              **measure(ref, syn, source_rows(set_dir, classes, labelled, syn), labelled, real_subset(cfg, test), ev,
                        accelerator.device, progress)}
    if cas if cas is not None else ev.cas:
        record["cas"] = classification_accuracy_score(cfg, set_dir, out / "cas", accelerator)
    record["seconds"] = round(time.time() - t0, 1)
    if accelerator.is_main_process:
        write_evaluation(record, out, cfg)
    return record


def classification_accuracy_score(cfg: Any, set_dir: Path, out: Path, accelerator: Any) -> dict:
    """CAS: classifiers trained on the synthetic set alone (strategy synthetic_only), tested on real data."""
    from mvc.classifier.metrics import sample_std
    from mvc.classifier.train import run_all

    c = copy.deepcopy(cfg)
    c.run.output_dir = str(out)
    c.classifier = dataclasses.replace(c.classifier, strategy="synthetic_only", synthetic_dir=str(set_dir),
                                       seeds=list(cfg.pipeline.seeds), results_csv=None, synthetic_ratio=None)
    c.generate = dataclasses.replace(c.generate, out_dir=None, grid_dir=None)
    c.pipeline = dataclasses.replace(c.pipeline, report="results.md")
    recs = run_all(c, accelerator)
    accs = [r["last"]["accuracy"] for r in recs]
    return {"mean": float(np.mean(accs)), "std": sample_std(accs), "values": accs, "seeds": list(cfg.pipeline.seeds),
            "backbone": cfg.classifier.backbone, "steps": cfg.classifier.steps, "epochs": recs[0]["epochs"]}


#################################################################################
#                                     Report                                    #
#################################################################################

def summary_row(record: dict) -> dict:
    """The headline numbers of one evaluation (a row of the synthetic-set tables)."""
    cas = record.get("cas")
    return {"fidelity": record["fidelity"]["overall"], "diversity_ratio": record["diversity"]["ratio"],
            "fd": record["frechet"]["synthetic_vs_test"], "fd_real": record["frechet"]["labelled_vs_test"],
            "to_source": record["novelty"]["to_source"], "to_nearest_other": record["novelty"]["to_nearest_other"],
            "cas_mean": cas["mean"] if cas else None, "cas_std": cas["std"] if cas else None,
            "images": record["images"]}


def table_markdown(rows: list[tuple[str, dict]], first: str = "set") -> str:
    """A markdown table of `summary_row`s (fidelity, diversity, FD-ref, novelty, CAS)."""
    lines = [f"| {first} | images | label fidelity (%) | diversity ratio | FD-ref (real floor) | "
             "novelty: to source / nearest other | CAS (%) |", "|---|---|---|---|---|---|---|"]
    def num(v: float | None) -> str:  # no source image (txt2img): no distance to it
        return "-" if v is None or not np.isfinite(v) else f"{v:.3f}"

    for label, r in rows:
        cas = f"{100 * r['cas_mean']:.1f} ± {100 * r['cas_std']:.1f}" if r.get("cas_mean") is not None else "-"
        lines.append(f"| {label} | {r['images']} | {100 * r['fidelity']:.1f} | {r['diversity_ratio']:.2f} | "
                     f"{r['fd']:.2f} ({r['fd_real']:.2f}) | {num(r['to_source'])} / {num(r['to_nearest_other'])} | {cas} |")
    return "\n".join(lines) + "\n"


def write_evaluation(record: dict, out: Path, cfg: Any) -> None:
    """metrics.json, report.md, figure.png and TensorBoard scalars of one evaluation."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", record)
    classes = record["classes"]
    fid, div = record["fidelity"], record["diversity"]
    ref = record["reference"]
    lines = [f"# Synthetic set `{record['name']}` ({record['set']})", "", NOTE + f" Reference: `{ref['backbone']}`, "
             f"{ref['train_images']} training images, {100 * (ref['test_accuracy'] or float('nan')):.1f}% on the test "
             f"split ({100 * record['reference_accuracy_on_real']:.1f}% on the real images compared here).", "",
             table_markdown([(record["name"], summary_row(record))]), "",
             "| class | images | label fidelity (%) | diversity (synthetic / real) |", "|---|---|---|---|"]
    for c, name in enumerate(classes):
        f = fid["per_class"][c]
        s, r = div["synthetic_per_class"][c], div["real_per_class"][c]
        lines.append(f"| {name} | {fid['count'][c]} | {'-' if f is None else f'{100 * f:.1f}'} | "
                     f"{'-' if s is None else f'{s:.3f}'} / {'-' if r is None else f'{r:.3f}'} |")
    nov = record["novelty"]
    lines += ["", f"Novelty (cosine distance in the reference's features): {nov['to_source']:.3f} to the source image, "
              f"{nov['to_nearest_other']:.3f} to the nearest other labelled image (between labelled images: "
              f"{nov['real_nearest_other']:.3f}); the nearest labelled image is the source for "
              f"{100 * nov['nearest_is_source']:.1f}% of the images.", "", "![per class](figure.png)", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    logger = RunLogger(out)
    try:
        logger.config(dataclasses.asdict(cfg), metrics=["evaluate/fidelity", "evaluate/diversity_ratio"])
        logger.scalars(0, {k: v for k, v in summary_row(record).items() if v is not None}, prefix="evaluate/")
        fig = per_class_figure(record)
        logger.figure("evaluate/per_class", fig, 0, path=out / "figure.png")
        import matplotlib.pyplot as plt

        plt.close(fig)
    finally:
        logger.close()


def per_class_figure(record: dict):
    """Two panels: label fidelity per class; within-class diversity, synthetic beside real."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = record["classes"]
    x = np.arange(len(classes))
    nan = lambda v: float("nan") if v is None else v  # noqa: E731
    fig, (a, b) = plt.subplots(1, 2, figsize=(max(8, 0.7 * len(classes) + 4), 3.4))
    a.bar(x, [100 * nan(v) for v in record["fidelity"]["per_class"]], color="#7aa6d6")
    a.axhline(100 * record["fidelity"]["overall"], color="k", lw=1, ls="--")
    a.set_ylabel("label fidelity (%)")
    a.set_ylim(0, 100)
    b.bar(x - 0.2, [nan(v) for v in record["diversity"]["synthetic_per_class"]], 0.4, label="synthetic", color="#7aa6d6")
    b.bar(x + 0.2, [nan(v) for v in record["diversity"]["real_per_class"]], 0.4, label="real", color="#c9c9c9")
    b.set_ylabel("within-class diversity")
    b.legend(fontsize=8)
    for ax in (a, b):
        step = max(1, len(classes) // 25)  # at most ~25 labels, so 100 classes stay readable
        ax.set_xticks(x[::step], [c[:12] for c in classes][::step], rotation=60, ha="right", fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{record['name']}: fidelity {100 * record['fidelity']['overall']:.1f}%, diversity ratio "
                 f"{record['diversity']['ratio']:.2f}", fontsize=10)
    fig.tight_layout()
    return fig


#################################################################################
#                         Equivalent real images                               #
#################################################################################

def real_curve(cfg: Any, accelerator: Any) -> dict:
    """Real-only classifiers at each of `evaluate.real_curve` labelled sizes (same seeds and budget):
    {size: [accuracies]} (runs already done are read back)."""
    import json

    from mvc.classifier.outputs import run_dir_for
    from mvc.classifier.train import run_all

    out = {}
    for k in cfg.evaluate.real_curve:
        c = copy.deepcopy(cfg)
        c.run.output_dir = str(RunPaths.of(cfg).evaluation / "real_curve" / f"k{k}")
        c.data = dataclasses.replace(c.data, k_per_class=int(k))
        c.classifier = dataclasses.replace(c.classifier, strategy="real", seeds=list(cfg.pipeline.seeds),
                                           results_csv=None)
        c.generate = dataclasses.replace(c.generate, out_dir=None, grid_dir=None)
        c.pipeline = dataclasses.replace(c.pipeline, report="results.md")
        done = [run_dir_for(c, s) / "metrics.json" for s in c.classifier.seeds]
        if all(p.is_file() for p in done):
            out[int(k)] = [json.loads(p.read_text())["last"]["accuracy"] for p in done]
        else:
            out[int(k)] = [r["last"]["accuracy"] for r in run_all(c, accelerator)]
    return out


def equivalents(curve: dict, accuracies: dict[str, float]) -> dict:
    """{run: equivalent real images per class} of each strategy's mean accuracy on the mean real-only curve."""
    sizes = sorted(curve)
    means = [float(np.mean(curve[k])) for k in sizes]
    return {run: equivalent_real(sizes, means, acc) for run, acc in accuracies.items()}


def curve_figure(curve: dict, accuracies: dict[str, float], path: Path) -> None:
    """Accuracy vs labelled images per class (real only), with each strategy's accuracy as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(curve)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    m = [100 * np.mean(curve[k]) for k in sizes]
    s = [100 * np.std(curve[k], ddof=1) if len(curve[k]) > 1 else 0 for k in sizes]
    ax.errorbar(sizes, m, yerr=s, marker="o", color="k", label="real only", capsize=3)
    for i, (run, acc) in enumerate(accuracies.items()):
        ax.axhline(100 * acc, ls="--", lw=1, color=f"C{i}", label=run)
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(k) for k in sizes])
    ax.set_xlabel("labelled real images per class")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
