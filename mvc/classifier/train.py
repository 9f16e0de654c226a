"""Classifier runs: one (seed, fold) run with checkpoints and metrics, and the multi-seed / k-fold driver.

Model selection ("best" epoch). With `classifier.val_fraction > 0` a stratified part of the labelled
set is held out (its synthetic offspring too) and the best epoch is the one with the best validation
accuracy; test metrics are computed at that epoch. With `val_fraction = 0` (the default, since every
labelled image counts in the low-data regime) the best epoch is the one with the best *test*
accuracy, which is optimistic: metrics.json says so (`best_selected_on: "test"`) and the `last`
metrics are the honest number to report.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch

from mvc.classifier.augment import Augment
from mvc.classifier.data import Combined, eval_loader, plan_loader, prepare_data, prepared, shard_batches
from mvc.classifier.engine import build_optimizer, evaluate, plan_lr, train_one_epoch
from mvc.classifier.metrics import compute_metrics, mean_std
from mvc.classifier.models import build_model
from mvc.classifier.outputs import RunSpec, describe_run, write_run_outputs, write_summary
from mvc.classifier.strategies import build_strategy
from mvc.core import seeds
from mvc.core.checkpoint import check_resume, list_checkpoints, resolve_resume, rng_state, save_checkpoint
from mvc.core.perf import peak_memory_gb, reset_peak_memory
from mvc.core.utils import MVCError, RunLogger, atomic_write_json

log = logging.getLogger(__name__)

# Keys that may change between a run and its resumption without changing the result.
RESUME_FREE_KEYS = {"seeds", "num_workers", "checkpoint_every", "checkpoints_keep", "results_csv"}


#################################################################################
#                               One training run                                #
#################################################################################

def trained_on_record(spec: RunSpec, data: dict) -> dict:
    """What a classifier run's weights depend on (recorded in its checkpoints; a resume must match it): the
    data.* and classifier.* keys that change the result, the seed and fold, and the images it trains on."""
    syn = data["synthetic"]
    return {**{f"data.{k}": v for k, v in dataclasses.asdict(spec.data).items()},
            **{f"classifier.{k}": v for k, v in dataclasses.asdict(spec.classifier).items() if k not in RESUME_FREE_KEYS},
            "seed": spec.seed, "fold": spec.fold, "train_images": data["train"].fingerprint(),
            "synthetic_images": syn.fingerprint() if syn is not None else None,
            "synthetic_set": data.get("synthetic_fingerprint")}


@dataclasses.dataclass
class _Run:
    """One classifier run's data, model and training parts, and what it is (`spec`: where its files go)."""
    spec: RunSpec
    c: Any  # cfg.classifier
    d: dict  # prepare_data's splits
    model: Any
    meta: Any
    real: Any
    syn: Any
    data: Combined
    augment: Augment
    test_ds: Any
    val_ds: Any
    strategy: Any
    optimizer: Any
    loss_fn: Any

    @property
    def run_dir(self) -> Path:
        return self.spec.run_dir

    @property
    def ckpt_dir(self) -> Path:
        return self.spec.ckpt_dir


def build_run(spec: RunSpec, splits, world: int) -> _Run:
    """Data and model (model init seeded identically on every rank; DDP also broadcasts rank 0's weights), the
    strategy and the optimizer."""
    c = spec.classifier
    d = prepare_data(spec, splits)
    seeds.seed_everything(seeds.derive_seed(spec.seed, "classifier.init"))
    model, meta = build_model(c.backbone, len(d["classes"]), c.pretrained, c.cifar_stem, c.input_size,
                              channels_last=c.channels_last)
    real = prepared(d["train"], meta)
    syn = prepared(d["synthetic"], meta, synthetic=True) if d["synthetic"] else None
    augment = Augment(meta, c.augment, c.autoaugment_policy)
    data = Combined(real, syn)
    test_ds = prepared(d["test"], meta)
    val_ds = prepared(d["val"], meta) if d["val"] is not None else None
    # the same optimizer-step budget for every strategy: the epoch count follows the strategy's epoch size
    strategy = build_strategy(c, data.n_real, data.n_syn, world)
    optimizer = build_optimizer(model.parameters(), c)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=c.label_smoothing)
    return _Run(spec, c, d, model, meta, real, syn, data, augment, test_ds, val_ds, strategy, optimizer, loss_fn)


def resume_run(run: _Run, resume: str | None, trained_on: dict, world: int, main: bool) -> dict | None:
    """Load the checkpoint `resume` names into the run (returns its state), or start fresh: the main process
    removes an earlier run's checkpoints."""
    state = resolve_resume(resume, run.ckpt_dir, kind="classifier", trained_on=trained_on)
    if state is not None:
        if int(state.get("world_size", world)) != world:
            raise MVCError(f"cannot resume: the checkpoint was made with {state['world_size']} process(es), this run "
                           f"has {world} (the epoch plan depends on it); resume with the same number of processes")
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        if main:
            log.info("resumed %s at epoch %d", run.run_dir, int(state["epoch"]))
    elif main:
        stale = list_checkpoints(run.ckpt_dir)
        if stale:
            log.warning("starting %s fresh: removing %d checkpoint(s) of an earlier run", run.run_dir.name, len(stale))
            for p in stale:
                p.unlink(missing_ok=True)
    return state


def measure_test(run: _Run, accelerator) -> dict:
    """Metrics of the model on the test split (every process evaluates its share)."""
    loader = eval_loader(run.test_ds, run.meta, run.c.batch_size * 2, accelerator.process_index,
                         accelerator.num_processes)
    y, p = evaluate(run.model, loader, accelerator)
    return compute_metrics(y, p, len(run.d["classes"]))


def evaluate_epoch(run: _Run, accelerator, epoch: int, stats: dict, best: dict | None) -> tuple[dict | None, dict | None]:
    """Evaluate every `eval_every` epochs (0: only the last one) and at the end: the selection signal (validation,
    else test accuracy) goes into `stats`; returns (best, the final epoch's test metrics when measured here)."""
    c, epochs = run.c, run.strategy.epochs
    if not (epoch + 1 == epochs or (c.eval_every > 0 and (epoch + 1) % c.eval_every == 0)):
        return best, None
    last = None
    if run.val_ds is not None:
        loader = eval_loader(run.val_ds, run.meta, c.batch_size * 2, accelerator.process_index,
                             accelerator.num_processes)
        y, p = evaluate(run.model, loader, accelerator)
        signal = compute_metrics(y, p, len(run.d["classes"]))["accuracy"]
        stats["val_accuracy"] = signal
    else:
        last = measure_test(run, accelerator)
        signal = last["accuracy"]
        stats["test_accuracy"] = signal
    if best is None or signal > best["signal"]:
        m = last if last is not None else measure_test(run, accelerator)
        if epoch + 1 == epochs:
            last = m  # the final epoch's test metrics: not evaluated a second time
        best = {"epoch": epoch + 1, "signal": float(signal), **m}
    return best, last


def train_epoch(run: _Run, accelerator, seed: int, epoch: int) -> dict:
    """One epoch of the strategy's plan; its stats (time, phase, images seen)."""
    rank, world, c = accelerator.process_index, accelerator.num_processes, run.c
    seeds.seed_everything(seeds.derive_seed(seed, "classifier.epoch", rank, epoch))
    plan = run.strategy.epoch_plan(epoch, seed)
    batches = shard_batches(plan.batches, rank, world)
    loader = plan_loader(run.data, batches, c.num_workers, seeds.generator(seed, "classifier.loader", rank, epoch),
                         run.augment)
    te = time.time()
    stats = train_one_epoch(run.model, loader, run.optimizer, accelerator, run.loss_fn,
                            lambda s: plan_lr(c, plan, s), epoch, show_progress=accelerator.is_main_process)
    stats["epoch_time_s"] = round(time.time() - te, 3)
    stats["phase"] = plan.phase
    stats["images_seen"] = plan.num_images  # every process's batches (stats["images"]: this process's)
    stats["synthetic_seen"] = plan.num_synthetic(run.data.n_real)
    return stats


def final_record(run: _Run, world: int, last: dict, best: dict | None, history: list[dict], t0: float,
                 device) -> dict:
    """metrics.json of a finished run."""
    c, strategy, data, spec = run.c, run.strategy, run.data, run.spec
    selected_on = "val" if run.val_ds is not None else "test"
    return {
        "dataset": spec.data.name, "k_per_class": spec.data.k_per_class, "backbone": c.backbone,
        "strategy": strategy.tag(), "augment": c.augment, "generator": spec.generator,
        "synthetic_set": run.d.get("synthetic_fingerprint"), "seed": spec.seed, "fold": spec.fold, "probe": c.probe,
        "epochs": strategy.epochs, "steps": sum(h["steps"] for h in history), "budget_steps": strategy.total_steps,
        "phase_steps": strategy.phase_steps(), "images_seen": sum(h["images_seen"] for h in history),
        "synthetic_seen": sum(h["synthetic_seen"] for h in history), "n_real": data.n_real, "n_synthetic": data.n_syn,
        "n_val": len(run.val_ds) if run.val_ds is not None else 0, "n_test": len(run.test_ds),
        "classes": run.d["classes"], "best_selected_on": selected_on,
        "note": ("best = epoch with the best validation accuracy" if selected_on == "val" else
                 "best = epoch with the best TEST accuracy (optimistic; report 'last', or set classifier.val_fraction)"),
        "last": {"epoch": strategy.epochs, **last}, "best": best, "history": history,
        "input_size": run.meta.input_size, "world_size": world, "time_s": round(time.time() - t0, 2),
        "train_steps_per_s": round(sum(h["steps"] for h in history) / max(sum(h["epoch_time_s"] for h in history), 1e-9), 3),
        "peak_memory_gb": peak_memory_gb(device),
        "run_dir": str(run.run_dir),
    }


def run_classifier(spec: RunSpec, accelerator, splits=None, resume: str | None = None,
                   stop_after: int | None = None) -> dict | None:
    """Train (or resume) the classifier run `spec` describes; write metrics.json, confusion matrices and a
    results-CSV row.

    Returns the metrics record, or None when stopped early by `stop_after` (epochs completed).
    """
    c, seed = spec.classifier, spec.seed
    world, main = accelerator.num_processes, accelerator.is_main_process
    t0 = time.time()
    reset_peak_memory(accelerator.device)

    # 1. data, model, strategy and optimizer
    run = build_run(spec, splits, world)
    epochs = run.strategy.epochs

    # 2. resume or start fresh
    trained_on = trained_on_record(spec, run.d)
    state = resume_run(run, resume, trained_on, world, main)
    start, best, history = 0, None, []
    if state is not None:
        start, best, history = int(state["epoch"]), state.get("best"), list(state.get("history", []))
    accelerator.wait_for_everyone()
    run.model, run.optimizer = accelerator.prepare(run.model, run.optimizer)
    if c.num_workers > 0:  # workers get copies of the datasets: fill the image caches once, here
        for ds in (run.real, run.syn):
            if ds is not None:
                ds.warm(progress=main)
    logger = RunLogger(run.run_dir, enabled=main, truncate_to=start if state is not None else -1)  # no replayed records
    logger.config(spec.config, metrics=["test_last/accuracy"])

    # 3. epochs: each one a pure function of (seed, epoch), so resuming replays exactly
    last = None
    for epoch in range(start, epochs):
        stats = train_epoch(run, accelerator, seed, epoch)
        best, last = evaluate_epoch(run, accelerator, epoch, stats, best)
        history.append({"epoch": epoch + 1, **{k: (v if isinstance(v, (str, int)) else float(v)) for k, v in stats.items()}})
        logger.scalars(epoch + 1, {k: v for k, v in stats.items() if not isinstance(v, str)}, prefix="train/")
        if main:
            log.info("epoch %d/%d %s", epoch + 1, epochs, {k: round(v, 4) if isinstance(v, float) else v
                                                             for k, v in stats.items()})
        done = epoch + 1
        if done % c.checkpoint_every == 0 or done == epochs or (stop_after is not None and done >= stop_after):
            if main:
                save_checkpoint(run.ckpt_dir, done, {
                    "model": accelerator.unwrap_model(run.model).state_dict(),
                    "optimizer": run.optimizer.state_dict(),
                    "epoch": done, "best": best, "history": history, "rng": rng_state(),
                    "classes": run.d["classes"], "model_meta": run.meta.to_dict(), "seed": int(seed), "world_size": world,
                }, spec.config, keep=c.checkpoints_keep, kind="classifier", trained_on=trained_on)
            accelerator.wait_for_everyone()
        if stop_after is not None and done >= stop_after and done < epochs:
            logger.close()
            return None

    # 4. final metrics (the last epoch's test metrics may already be there)
    if last is None:
        last = measure_test(run, accelerator)
    record = final_record(run, world, last, best, history, t0, accelerator.device)
    if main:
        write_run_outputs(record, spec, logger)
    logger.close()
    return record


#################################################################################
#                           Seeds, folds and summaries                          #
#################################################################################

def run_all(cfg, accelerator=None, splits=None, resume: str | None = None, stop_after: int | None = None) -> list[dict]:
    """Every seed of `classifier.seeds` (and every fold when `classifier.kfold`), then the summary."""
    from mvc.classifier.models import check_backbone
    from mvc.core.distributed import make_accelerator
    from mvc.core.paths import RunPaths

    c, paths = cfg.classifier, RunPaths.of(cfg)
    check_backbone(c.backbone)
    folds = list(range(c.kfold)) if c.kfold else [None]
    specs = {(seed, fold): describe_run(cfg, seed, fold, paths) for seed in c.seeds for fold in folds}
    if resume == "latest":  # before any data loading: is there anything to resume at all?
        if not any(list_checkpoints(s.ckpt_dir) for s in specs.values()):
            raise MVCError(f"--resume latest: no checkpoint for these runs in {paths.classifier}; "
                           "run without --resume to start fresh")
    else:
        check_resume(resume, "")
    accelerator = accelerator or make_accelerator(c.mixed_precision)
    if accelerator.gradient_accumulation_steps > 1:  # a budget step is one optimizer update of one batch per process
        raise MVCError(f"classifier runs take one optimizer step per batch (classifier.steps counts them), but accelerate "
                       f"accumulates {accelerator.gradient_accumulation_steps} batches per step; launch "
                       "train_classifier.py without gradient accumulation, or raise classifier.batch_size instead")
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
                rec = run_probe(specs[seed, fold], accelerator, splits)
            else:  # 'latest' resumes the runs that have a checkpoint; the others start fresh
                has_ckpt = bool(list_checkpoints(specs[seed, fold].ckpt_dir))
                rec = run_classifier(specs[seed, fold], accelerator, splits,
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


