"""Classifier runs: one (seed, fold) run with checkpoints and metrics, and the multi-seed / k-fold driver.

Model selection ("best" epoch). With `classifier.val_fraction > 0` a stratified part of the labelled
set is held out (its synthetic offspring too) and the best epoch is the one with the best validation
accuracy; test metrics are computed at that epoch. With `val_fraction = 0` (the default, since every
labelled image counts in the low-data regime) the best epoch is the one with the best *test*
accuracy, which is optimistic: metrics.json says so (`best_selected_on: "test"`) and the `last`
metrics are the honest number to report.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from mvc.checkpoint import check_resume, list_checkpoints, resolve_resume, rng_state, save_checkpoint
from mvc.classifier.data import (
    Combined,
    IndexView,
    eval_loader,
    kfold_splits,
    load_synthetic,
    plan_loader,
    prepared,
    select_synthetic,
    shard_batches,
    stratified_split,
    stratified_take,
)
from mvc.classifier.engine import build_optimizer, evaluate, plan_lr, train_one_epoch
from mvc.classifier.metrics import SCALARS, compute_metrics, confusion_figure, mean_std
from mvc.classifier.models import build_model
from mvc.classifier.strategies import STRATEGIES, build_strategy, epochs_for_steps
from mvc.config import config_to_dict
from mvc.utils import MVCError, RunLogger, atomic_write_json, fingerprint, make_generator, safe_name, seed_everything

log = logging.getLogger(__name__)

# Keys that may change between a run and its resumption without changing the result.
RESUME_FREE_KEYS = {"seeds", "num_workers", "checkpoint_every", "checkpoints_keep", "results_csv"}
CSV_COLUMNS = ["dataset", "k_per_class", "backbone", "strategy", "augment", "seed", "fold", *SCALARS,
               "best_accuracy", "best_epoch", "best_selected_on", "epochs", "n_real", "n_synthetic", "probe", "run_dir"]


def get_accelerator(cfg):
    """The accelerate `Accelerator` of a classifier run (device, DDP, mixed precision)."""
    from accelerate import Accelerator
    from accelerate.utils import is_xpu_available

    # accelerate only picks multi-process CPU (gloo) when told `cpu=True`: do so for a torchrun /
    # accelerate-launch run on a machine without an accelerator
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = multi and not torch.cuda.is_available() and not is_xpu_available()
    try:
        return Accelerator(mixed_precision=cfg.classifier.mixed_precision, cpu=cpu)
    except (ValueError, RuntimeError) as e:  # e.g. fp16 requested on a machine without a GPU
        raise MVCError(f"cannot set up accelerate (classifier.mixed_precision="
                       f"{cfg.classifier.mixed_precision}): {str(e).splitlines()[0]}") from None


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of everything random in one epoch of one process (augmentation, dropout, workers)."""
    return int(fingerprint(int(seed) + int(rank), int(epoch)), 16) & 0x7FFFFFFFFFFFFFFF


def run_name(cfg, seed: int) -> str:
    """`<strategy>-<augment>-<backbone>-seed<seed>` (probes: `<strategy>-probe_<probe>-<backbone>-seed<seed>`)."""
    c = cfg.classifier
    tag = STRATEGIES.get(c.strategy).tag_for(c)
    mid = f"probe_{c.probe}" if c.probe != "none" else c.augment
    return f"{tag}-{mid}-{safe_name(c.backbone)}-seed{seed}"


#################################################################################
#                                  Data                                         #
#################################################################################

def prepare_data(cfg, seed: int, splits=None, fold: int | None = None) -> dict:
    """Real train / val / test sources and the synthetic source of one (seed, fold) run."""
    c = cfg.classifier
    if splits is None:
        from mvc.data import load_splits
        splits = load_splits(cfg.data)
    labelled, _pool, test = splits
    classes = list(labelled.classes)
    held_out: set[str] = set()
    train = IndexView(labelled, np.arange(len(labelled)))
    if fold is not None:
        tr, te = kfold_splits(labelled.targets, c.kfold, cfg.data.subset_seed)[fold]
        train, test = IndexView(labelled, tr), IndexView(labelled, te)
        held_out |= set(test.ids)
    elif c.test_limit is not None and len(test) > c.test_limit:
        # the same class-balanced test subset for every seed and strategy (seeded by the data subset seed)
        test = IndexView(test, stratified_take(test.targets, c.test_limit, cfg.data.subset_seed))
    val = None
    if c.val_fraction > 0:
        tr, va = stratified_split(train.targets, c.val_fraction, cfg.data.subset_seed)
        train, val = IndexView(train, tr), IndexView(train, va)
        held_out |= set(val.ids)
    syn = None
    if STRATEGIES.get(c.strategy).needs_synthetic:
        syn_dir = c.synthetic_dir or os.path.join(cfg.run.output_dir, "synthetic")
        syn = load_synthetic(syn_dir, classes, exclude_sources=held_out)
        if len(syn) == 0:
            raise MVCError(f"strategy {c.strategy!r} needs synthetic images but {syn_dir} has none; "
                           f"run generate_mvc.py first, set classifier.synthetic_dir, or use --strategy real")
        syn = IndexView(syn, select_synthetic(syn.targets, len(train), c.synthetic_ratio, seed))
    return {"classes": classes, "train": train, "val": val, "test": test, "synthetic": syn}


#################################################################################
#                               One training run                                #
#################################################################################

def _check_resume(state: dict, cfg) -> None:
    """Refuse to resume a checkpoint made with different data/classifier settings."""
    old = state.get("config", {})
    new = config_to_dict(cfg)
    diffs = [f"data.{k}" for k in new["data"] if old.get("data", {}).get(k) != new["data"][k]]
    diffs += [f"classifier.{k}" for k in new["classifier"]
              if k not in RESUME_FREE_KEYS and old.get("classifier", {}).get(k) != new["classifier"][k]]
    if diffs:
        raise MVCError(f"cannot resume: the checkpoint was made with different {', '.join(diffs)}; "
                       f"restore those settings or start fresh without --resume")


def _scalars(m: dict) -> dict:
    """The scalar metrics of a metrics dict."""
    return {k: m[k] for k in SCALARS}


def run_dir_for(cfg, seed: int, fold: int | None = None) -> Path:
    """`<output_dir>/classifier/<run name>[/fold<k>]`: where one classifier run writes."""
    run_dir = Path(cfg.run.output_dir) / "classifier" / run_name(cfg, seed)
    return run_dir / f"fold{fold}" if fold is not None else run_dir


def run_classifier(cfg, seed: int, accelerator, splits=None, fold: int | None = None,
                   resume: str | None = None, stop_after: int | None = None) -> dict | None:
    """Train (or resume) one classifier; write metrics.json, confusion matrices and a results-CSV row.

    Returns the metrics record, or None when stopped early by `stop_after` (epochs completed).
    """
    c = cfg.classifier
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    run_dir = run_dir_for(cfg, seed, fold)
    ckpt_dir = run_dir / "checkpoints"
    t0 = time.time()

    # 1. data and model (model init seeded identically on every rank; DDP also broadcasts rank 0's weights)
    d = prepare_data(cfg, seed, splits, fold)
    seed_everything(seed)
    model, meta = build_model(c.backbone, len(d["classes"]), c.pretrained, c.cifar_stem, c.input_size)
    real = prepared(d["train"], meta, c.augment, c.autoaugment_policy)
    syn = prepared(d["synthetic"], meta, c.augment, c.autoaugment_policy, synthetic=True) if d["synthetic"] else None
    data = Combined(real, syn)
    test_ds = prepared(d["test"], meta)
    val_ds = prepared(d["val"], meta) if d["val"] is not None else None
    if c.steps is not None:  # a fixed optimizer-step budget: the epoch count follows the strategy's epoch size
        c = dataclasses.replace(c, epochs=epochs_for_steps(c, data.n_real, data.n_syn, seed))
    strategy = build_strategy(c, data.n_real, data.n_syn)
    optimizer = build_optimizer(model.parameters(), c)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=c.label_smoothing)

    # 2. resume or start fresh
    start, best, history = 0, None, []
    state = resolve_resume(resume, ckpt_dir)
    if state is not None:
        _check_resume(state, cfg)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, best, history = int(state["epoch"]), state.get("best"), list(state.get("history", []))
        if main:
            log.info("resumed %s at epoch %d", run_dir, start)
    elif main:
        stale = list_checkpoints(ckpt_dir)
        if stale:
            log.warning("starting %s fresh: removing %d checkpoint(s) of an earlier run", run_dir.name, len(stale))
            for p in stale:
                p.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    model, optimizer = accelerator.prepare(model, optimizer)
    logger = RunLogger(run_dir, enabled=main)
    selected_on = "val" if val_ds is not None else "test"

    def test_metrics() -> dict:
        y, p = evaluate(model, eval_loader(test_ds, c.batch_size * 2, rank, world), accelerator)
        return compute_metrics(y, p, len(d["classes"]))

    # 3. epochs: each one a pure function of (seed, epoch), so resuming replays exactly
    last = None
    for epoch in range(start, c.epochs):
        seed_everything(epoch_seed(seed, rank, epoch))
        plan = strategy.epoch_plan(epoch, seed)
        batches = shard_batches(plan.batches, rank, world)
        loader = plan_loader(data, batches, c.num_workers, make_generator(seed + rank, epoch))
        te = time.time()
        stats = train_one_epoch(model, loader, optimizer, accelerator, loss_fn,
                                lambda s: plan_lr(c, plan, epoch, s, len(batches)), epoch, show_progress=main)
        stats["epoch_time_s"] = round(time.time() - te, 3)
        stats["phase"] = plan.phase
        # evaluate every `eval_every` epochs (0: only the last one) and at the end
        evaluate_now = epoch + 1 == c.epochs or (c.eval_every > 0 and (epoch + 1) % c.eval_every == 0)
        last = None
        if evaluate_now and val_ds is not None:
            y, p = evaluate(model, eval_loader(val_ds, c.batch_size * 2, rank, world), accelerator)
            signal = compute_metrics(y, p, len(d["classes"]))["accuracy"]
            stats["val_accuracy"] = signal
        elif evaluate_now:
            last = test_metrics()
            signal = last["accuracy"]
            stats["test_accuracy"] = signal
        if evaluate_now and (best is None or signal > best["signal"]):
            m = last if last is not None else test_metrics()
            if epoch + 1 == c.epochs:
                last = m  # the final epoch's test metrics: not evaluated a second time below
            best = {"epoch": epoch + 1, "signal": float(signal), **m}
        history.append({"epoch": epoch + 1, **{k: (v if isinstance(v, (str, int)) else float(v)) for k, v in stats.items()}})
        logger.scalars(epoch + 1, {k: v for k, v in stats.items() if not isinstance(v, str)}, prefix="train/")
        if main:
            log.info("epoch %d/%d %s", epoch + 1, c.epochs, {k: round(v, 4) if isinstance(v, float) else v
                                                             for k, v in stats.items()})
        done = epoch + 1
        if done % c.checkpoint_every == 0 or done == c.epochs or (stop_after is not None and done >= stop_after):
            if main:
                save_checkpoint(ckpt_dir, done, {
                    "model": accelerator.unwrap_model(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": done, "best": best, "history": history, "rng": rng_state(),
                    "classes": d["classes"], "model_meta": meta.to_dict(), "seed": int(seed),
                }, config_to_dict(cfg), keep=c.checkpoints_keep)
            accelerator.wait_for_everyone()
        if stop_after is not None and done >= stop_after and done < c.epochs:
            logger.close()
            return None

    # 4. final metrics (the last epoch's test metrics may already be there)
    if last is None:
        last = test_metrics()
    record = {
        "dataset": cfg.data.name, "k_per_class": cfg.data.k_per_class, "backbone": c.backbone,
        "strategy": strategy.tag(), "augment": c.augment, "seed": int(seed), "fold": fold, "probe": c.probe,
        "epochs": c.epochs, "n_real": data.n_real, "n_synthetic": data.n_syn,
        "n_val": len(val_ds) if val_ds is not None else 0, "n_test": len(test_ds), "classes": d["classes"],
        "best_selected_on": selected_on,
        "note": ("best = epoch with the best validation accuracy" if selected_on == "val" else
                 "best = epoch with the best TEST accuracy (optimistic; report 'last', or set classifier.val_fraction)"),
        "last": {"epoch": c.epochs, **last}, "best": best, "history": history,
        "input_size": meta.input_size, "world_size": world, "time_s": round(time.time() - t0, 2),
        "run_dir": str(run_dir),
    }
    if main:
        write_run_outputs(record, run_dir, logger, cfg)
    logger.close()
    return record


def write_run_outputs(record: dict, run_dir: Path, logger: RunLogger, cfg) -> None:
    """metrics.json, confusion-matrix PNGs (+ TensorBoard) and the results-CSV row of one run."""
    import matplotlib.pyplot as plt

    atomic_write_json(run_dir / "metrics.json", record)
    for which in ("last", "best"):
        m = record[which]
        fig = confusion_figure(m["confusion_matrix"], record["classes"],
                               f"{which} (epoch {m['epoch']}): accuracy {m['accuracy']:.3f}")
        logger.figure(f"confusion/{which}", fig, m["epoch"], path=run_dir / f"confusion_{which}.png")
        plt.close(fig)
        logger.scalars(m["epoch"], _scalars(m), prefix=f"test_{which}/")
    append_results_row(results_csv_path(cfg), csv_row(record))


def csv_row(record: dict) -> dict:
    """One results-CSV row from a run record."""
    best = record.get("best") or {}
    return {**{k: record.get(k) for k in ["dataset", "k_per_class", "backbone", "strategy", "augment", "seed",
                                          "fold", "best_selected_on", "epochs", "n_real", "n_synthetic",
                                          "probe", "run_dir"]},
            **{k: round(record["last"][k], 6) for k in SCALARS},
            "best_accuracy": round(best["accuracy"], 6) if best else None, "best_epoch": best.get("epoch")}


def results_csv_path(cfg) -> Path:
    """classifier.results_csv, default <run.output_dir>/results.csv."""
    return Path(cfg.classifier.results_csv or os.path.join(cfg.run.output_dir, "results.csv"))


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


#################################################################################
#                           Seeds, folds and summaries                          #
#################################################################################

def run_all(cfg, accelerator=None, splits=None, resume: str | None = None, stop_after: int | None = None) -> list[dict]:
    """Every seed of `classifier.seeds` (and every fold when `classifier.kfold`), then the summary."""
    from mvc.classifier.models import check_backbone

    c = cfg.classifier
    check_backbone(c.backbone)
    folds = list(range(c.kfold)) if c.kfold else [None]
    if resume == "latest":  # before any data loading: is there anything to resume at all?
        dirs = [run_dir_for(cfg, seed, fold) / "checkpoints" for seed in c.seeds for fold in folds]
        if not any(list_checkpoints(d) for d in dirs):
            raise MVCError(f"--resume latest: no checkpoint for these runs in {Path(cfg.run.output_dir) / 'classifier'}; "
                           "run without --resume to start fresh")
    else:
        check_resume(resume, "")
    accelerator = accelerator or get_accelerator(cfg)
    if splits is None:
        from mvc.data import load_splits
        with accelerator.main_process_first():
            splits = load_splits(cfg.data)
    records = []
    for seed in c.seeds:
        per_fold = []
        for fold in folds:
            if c.probe != "none":
                from mvc.classifier.probe import run_probe
                rec = run_probe(cfg, seed, accelerator, splits, fold)
            else:  # 'latest' resumes the runs that have a checkpoint; the others start fresh
                has_ckpt = bool(list_checkpoints(run_dir_for(cfg, seed, fold) / "checkpoints"))
                rec = run_classifier(cfg, seed, accelerator, splits, fold,
                                     None if resume == "latest" and not has_ckpt else resume, stop_after)
            if rec is None:
                return records
            per_fold.append(rec)
        if c.kfold and accelerator.is_main_process:
            fold_dir = Path(per_fold[0]["run_dir"]).parent
            atomic_write_json(fold_dir / "metrics.json", {"folds": len(per_fold), "seed": seed,
                                                          "last": mean_std([r["last"] for r in per_fold])})
        records.extend(per_fold)
    if accelerator.is_main_process and len(records) > 1:
        write_summary(cfg, records)
    return records


def write_summary(cfg, records: list[dict]) -> Path:
    """`<strategy>-<augment>-<backbone>-summary.json`: mean ± std over seeds (and folds) of last/best metrics."""
    name = run_name(cfg, 0).rsplit("-seed", 1)[0]
    path = Path(cfg.run.output_dir) / "classifier" / f"{name}-summary.json"
    summary = {"runs": len(records), "seeds": sorted({r["seed"] for r in records}),
               "last": mean_std([r["last"] for r in records]),
               "best": mean_std([r["best"] for r in records if r.get("best")]),
               "best_selected_on": records[0].get("best_selected_on")}
    atomic_write_json(path, summary)
    acc = summary["last"]["accuracy"]
    print(f"{name}: last accuracy {acc['mean']:.4f} ± {acc['std']:.4f} over {len(records)} run(s)")
    return path
