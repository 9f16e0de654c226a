"""Feature probes: sklearn (logistic regression, SVC, MLP) on a frozen timm backbone's pooled features."""

from __future__ import annotations

import time
from typing import Callable

from mvc.classifier.data import Combined, eval_loader, prepare_data, prepared
from mvc.classifier.metrics import compute_metrics
from mvc.classifier.models import build_model, extract_features
from mvc.classifier.outputs import RunSpec, write_run_outputs
from mvc.core import seeds
from mvc.core.registry import Registry, publish_choices
from mvc.core.utils import MVCError, RunLogger

PROBE_STRATEGIES = ("real", "concat")

# name -> builder(seed) of the sklearn head that follows a StandardScaler ("none" in the config: no probe)
PROBES: Registry[Callable] = Registry("probe")
publish_choices("probe", PROBES)


@PROBES.register("logreg")
def _logreg(seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=2000, random_state=seed)


@PROBES.register("svc")
def _svc(seed: int):
    from sklearn.svm import SVC

    return SVC(kernel="rbf", random_state=seed)


@PROBES.register("mlp")
def _mlp(seed: int):
    from sklearn.neural_network import MLPClassifier

    return MLPClassifier(hidden_layer_sizes=(256,), max_iter=500, random_state=seed)


def build_probe(name: str, seed: int):
    """A standardise-then-classify sklearn pipeline with the `PROBES` head `name`."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), PROBES.get(name)(seed % 2**32))


def run_probe(run: RunSpec, accelerator, splits=None) -> dict:
    """Fit a probe on frozen features of the real (strategy 'real') or real + synthetic ('concat') images.

    Features are computed without augmentation; the run writes metrics.json and a results-CSV row
    like a trained run ('best' = 'last': there are no epochs). No checkpoint is written.
    """
    c, seed = run.classifier, run.seed
    if c.strategy not in PROBE_STRATEGIES:
        raise MVCError(f"classifier.probe works with strategies {' and '.join(PROBE_STRATEGIES)}, not {c.strategy!r}")
    t0 = time.time()
    d = prepare_data(run, splits)
    seeds.seed_everything(seeds.derive_seed(seed, "classifier.init"))
    model, meta = build_model(c.backbone, 0, c.pretrained, c.cifar_stem, c.input_size)  # 0 classes: pooled features
    model = model.to(accelerator.device)
    syn = prepared(d["synthetic"], meta, synthetic=True) if d["synthetic"] else None
    train = Combined(prepared(d["train"], meta), syn)
    x_tr, y_tr = extract_features(model, eval_loader(train, meta, c.batch_size * 2))
    x_te, y_te = extract_features(model, eval_loader(prepared(d["test"], meta), meta, c.batch_size * 2))
    probe = build_probe(c.probe, seed).fit(x_tr.numpy(), y_tr.numpy())
    m = compute_metrics(y_te.numpy(), probe.predict(x_te.numpy()), len(d["classes"]))
    record = {
        "dataset": run.data.name, "k_per_class": run.data.k_per_class, "backbone": c.backbone,
        "strategy": c.strategy, "augment": "none", "generator": run.generator, "seed": int(seed),
        "fold": run.fold, "probe": c.probe,
        "epochs": 0, "n_real": train.n_real, "n_synthetic": train.n_syn, "n_val": 0, "n_test": len(y_te),
        "classes": d["classes"], "best_selected_on": "none", "note": "feature probe: best = last",
        "last": {"epoch": 0, **m}, "best": {"epoch": 0, **m}, "history": [], "feature_dim": int(x_tr.shape[1]),
        "input_size": meta.input_size, "time_s": round(time.time() - t0, 2), "run_dir": str(run.run_dir),
    }
    if accelerator.is_main_process:
        logger = RunLogger(run.run_dir)
        write_run_outputs(record, run, logger)
        logger.close()
    return record
