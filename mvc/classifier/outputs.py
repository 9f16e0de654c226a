"""Where a classifier run writes, and what: run names, metrics.json, confusion figures, the results CSV,
summaries over seeds. Shared by trained runs (`mvc.classifier.train`) and feature probes."""

from __future__ import annotations

import csv
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mvc.classifier.metrics import SCALARS, confusion_figure, mean_std
from mvc.classifier.strategies import STRATEGIES
from mvc.core.paths import RunPaths, curation_tag
from mvc.core.utils import RunLogger, atomic_write_json, safe_name

CSV_COLUMNS = ["dataset", "k_per_class", "backbone", "strategy", "augment", "seed", "fold", *SCALARS,
               "best_accuracy", "best_epoch", "best_selected_on", "epochs", "steps", "images_seen", "n_real",
               "n_synthetic", "generator", "probe", "run_dir"]  # generator: the synthetic set's method (none: blank)


@dataclass(frozen=True)
class RunSpec:
    """One classifier run, described once: its config sections, seed and fold, the synthetic set it reads and
    where it writes. Built by `describe_run`; the training, the probes and the outputs take it."""
    classifier: Any  # cfg.classifier
    data: Any  # cfg.data
    config: dict  # the whole resolved config, recorded in checkpoints and TensorBoard
    seed: int
    fold: int | None
    synthetic_dir: Any  # the set the strategy reads (None: it reads none)
    generator: str | None  # that set's generator (None: no synthetic image)
    run_dir: Path
    results_csv: Path

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"


def synthetic_source(c, default_dir: Path, method: str, filters) -> tuple[Any, str | None, str]:
    """(folder, generator, curation tag) of the synthetic set a classifier run trains on; (None, None, '') when its
    strategy uses none. With `classifier.synthetic_dir`, the method and filters that set's settings record (a set
    of format 1 predates the registry: mvc), else `generate.method` and `curation.filters` (whose folder it reads)."""
    if not STRATEGIES.get(c.strategy).needs_synthetic:
        return None, None, ""
    if c.synthetic_dir:
        from mvc.data.synthetic import read_settings_file

        settings = (read_settings_file(Path(c.synthetic_dir).expanduser()) or {}).get("settings")
        if not isinstance(settings, dict):  # not a settings file: the data loader refuses the set itself
            return c.synthetic_dir, method, ""
        cur = settings.get("curation")
        tag = curation_tag(cur.get("filters", [])) if isinstance(cur, dict) else ""
        return c.synthetic_dir, str(settings.get("method", "mvc")), tag
    return default_dir, method, curation_tag(filters)


def describe_run(cfg, seed: int, fold: int | None = None, paths: RunPaths | None = None) -> RunSpec:
    """The run of (seed, fold) under `cfg`, named `<strategy>-<augment>-<backbone>-seed<seed>` (probes:
    `<strategy>-probe_<probe>-<backbone>-seed<seed>`); a run on the set of another generator than mvc says which
    before the seed (`...-<backbone>-img2img-seed0`), so runs on different sets never share a folder while the
    names of MVC runs stay what they were; a run on a curated set says how (`...-curated_easy_wrong-seed0`); then
    `classifier.run_tag` when set (`...-steps1000-seed0`). Its folder: `<output_dir>/classifier/<name>[/fold<k>]`."""
    c = cfg.classifier
    tag = STRATEGIES.get(c.strategy).tag_for(c)
    paths = paths if paths is not None else RunPaths.of(cfg)
    syn_dir, gen, cur = synthetic_source(c, paths.synthetic, cfg.generate.method, cfg.curation.filters)
    mid = f"probe_{c.probe}" if c.probe != "none" else c.augment
    extra = ("" if gen in (None, "mvc") else "-" + safe_name(gen)) + (f"-{cur}" if cur else "")
    extra += f"-{safe_name(c.run_tag)}" if c.run_tag else ""
    run_dir = paths.classifier / f"{tag}-{mid}-{safe_name(c.backbone)}{extra}-seed{seed}"
    return RunSpec(c, cfg.data, dataclasses.asdict(cfg), int(seed), fold, syn_dir, gen,
                   run_dir / f"fold{fold}" if fold is not None else run_dir, paths.results_csv)


def synthetic_generator(cfg) -> str | None:
    """The generator of the synthetic set a classifier run of `cfg` trains on (None: its strategy uses none)."""
    c = cfg.classifier
    return synthetic_source(c, None, cfg.generate.method, cfg.curation.filters)[1]


def run_dir_for(cfg, seed: int, fold: int | None = None) -> Path:
    """Where the classifier run of (seed, fold) under `cfg` writes."""
    return describe_run(cfg, seed, fold).run_dir


def _scalars(m: dict) -> dict:
    """The scalar metrics of a metrics dict."""
    return {k: m[k] for k in SCALARS}


def write_run_outputs(record: dict, run: RunSpec, logger: RunLogger) -> None:
    """metrics.json, confusion-matrix PNGs (+ TensorBoard) and the results-CSV row of one run."""
    import matplotlib.pyplot as plt

    run_dir = run.run_dir
    atomic_write_json(run_dir / "metrics.json", record)
    drawn = None  # (metrics, image) of the figure drawn last: 'best' is usually the last epoch, drawn once
    for which in ("last", "best"):
        m = record[which]
        path = run_dir / f"confusion_{which}.png"
        if drawn is not None and drawn[1] is not None and _same_metrics(drawn[0], m):
            logger.image(f"confusion/{which}", drawn[1], m["epoch"], path=path)
        else:
            fig = confusion_figure(m["confusion_matrix"], record["classes"],
                                   f"epoch {m['epoch']}: accuracy {m['accuracy']:.3f}")
            drawn = (m, logger.figure(f"confusion/{which}", fig, m["epoch"], path=path))
            plt.close(fig)
        logger.scalars(m["epoch"], _scalars(m), prefix=f"test_{which}/")
    append_results_row(run.results_csv, csv_row(record))


def _same_metrics(a: dict, b: dict) -> bool:
    """Whether two metric blocks describe the same evaluation (epoch, accuracy and confusion matrix)."""
    return a["epoch"] == b["epoch"] and a["accuracy"] == b["accuracy"] and a["confusion_matrix"] == b["confusion_matrix"]


def csv_row(record: dict) -> dict:
    """One results-CSV row from a run record."""
    best = record.get("best") or {}
    return {**{k: record.get(k) for k in ["dataset", "k_per_class", "backbone", "strategy", "augment", "generator",
                                          "seed", "fold", "best_selected_on", "epochs", "steps", "images_seen", "n_real",
                                          "n_synthetic", "probe", "run_dir"]},
            **{k: round(record["last"][k], 6) for k in SCALARS},
            "best_accuracy": round(best["accuracy"], 6) if best else None, "best_epoch": best.get("epoch")}


def append_results_row(path: Path, row: dict) -> None:
    """Append a row (header written when the file is new); flushed to disk at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    columns = CSV_COLUMNS
    if not new:
        with open(path, newline="") as f:
            columns = next(csv.reader(f), CSV_COLUMNS)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow({k: ("" if v is None else v) for k, v in row.items()})
        f.flush()
        os.fsync(f.fileno())


def write_summary(cfg, records: list[dict]) -> Path:
    """`<strategy>-<augment>-<backbone>-summary.json`: mean ± std over seeds (and folds) of last/best metrics."""
    run = describe_run(cfg, 0)
    name = run.run_dir.name.rsplit("-seed", 1)[0]
    path = run.run_dir.parent / f"{name}-summary.json"
    summary = {"runs": len(records), "seeds": sorted({r["seed"] for r in records}),
               "last": mean_std([r["last"] for r in records]),
               "best": mean_std([r["best"] for r in records if r.get("best")]),
               "best_selected_on": records[0].get("best_selected_on")}
    atomic_write_json(path, summary)
    acc = summary["last"]["accuracy"]
    print(f"{name}: last accuracy {acc['mean']:.4f} ± {acc['std']:.4f} over {len(records)} run(s)")
    return path


def run_accuracies(cfg, runs: list[str], seeds: list[int], default_augment: str) -> dict[str, list[float]]:
    """Last-epoch test accuracy of each finished (run, seed), run = 'strategy' or 'strategy+augment'."""
    import dataclasses
    import json

    out: dict[str, list[float]] = {}
    for run in runs:
        strategy, _, augment = run.partition("+")
        c = dataclasses.replace(cfg, classifier=dataclasses.replace(cfg.classifier, strategy=strategy,
                                                                    augment=augment or default_augment))
        out[run] = [json.loads(p.read_text())["last"]["accuracy"] for s in seeds
                    if (p := run_dir_for(c, s) / "metrics.json").is_file()]
    return out
