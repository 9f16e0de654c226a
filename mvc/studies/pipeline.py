"""The main job's plan (run_pipeline.py): the config of every stage it runs, checked before the first.

One config per generator's set (`pipeline.generators`: the first is the main set, in the user's folders; each
other one in its method's own), per classifier recipe (`pipeline.recipes`), run ('strategy[+augment]') and seed,
and the long runs at `pipeline.long_factor` times the classifier's budget.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mvc.core.config import Config, config_to_dict, make_config
from mvc.core.utils import MVCError


def split_run(run: str, default_augment: str | None = None) -> tuple[str, str | None]:
    """'strategy+augment' -> (strategy, augment); a bare strategy gets `default_augment` (the config's)."""
    strategy, _, augment = run.partition("+")
    return strategy, (augment or default_augment)


def check_runs(cfg: Config) -> None:
    """Refuse an unknown strategy or augmentation in pipeline.runs / pipeline.generator_runs, a generator run
    that uses no synthetic image, a generate.method the pipeline would not make, or a bad recipe, before the
    first stage."""
    from mvc.classifier.augment import AUGMENTATIONS
    from mvc.classifier.models import check_backbone
    from mvc.classifier.strategies import STRATEGIES, list_strategies

    augments = AUGMENTATIONS.names()
    extra = len(cfg.pipeline.generators) > 1
    for key, runs in (("pipeline.runs", cfg.pipeline.runs), ("pipeline.generator_runs", cfg.pipeline.generator_runs)):
        for run in runs:
            strategy, augment = split_run(run)
            if strategy not in list_strategies() or (augment is not None and augment not in augments):
                raise MVCError(f"{key}: unknown run {run!r}; use 'strategy' or 'strategy+augment' with a strategy "
                               f"from {', '.join(list_strategies())} and an augmentation from {', '.join(augments)}")
            if key == "pipeline.generator_runs" and extra and not STRATEGIES.get(strategy).needs_synthetic:
                raise MVCError(f"{key}: run {run!r} uses no synthetic image, so it is the same for every generator; "
                               "keep it in pipeline.runs")
    if cfg.pipeline.long_factor:
        for spec in cfg.pipeline.long_runs:
            run, gen = split_long(spec)
            strategy, augment = split_run(run)
            if strategy not in list_strategies() or (augment is not None and augment not in augments):
                raise MVCError(f"pipeline.long_runs: unknown run {spec!r}; use 'strategy[+augment][@generator]' with a "
                               f"strategy from {', '.join(list_strategies())} and an augmentation from "
                               f"{', '.join(augments)}")
            if gen is not None and not STRATEGIES.get(strategy).needs_synthetic:
                raise MVCError(f"pipeline.long_runs: run {spec!r} uses no synthetic image; drop '@{gen}'")
            if gen is not None and gen not in cfg.pipeline.generators:
                raise MVCError(f"pipeline.long_runs: run {spec!r} trains on the set of {gen}, which is not in "
                               f"pipeline.generators={cfg.pipeline.generators}")
    method, gens = cfg.generate.method, cfg.pipeline.generators
    if method != "mvc" and method not in gens:
        raise MVCError(f"generate.method={method} is not in pipeline.generators={gens}: the pipeline makes the sets of "
                       f"pipeline.generators (the first is the main one); set pipeline.generators=[{method}, ...]")
    for rc in recipe_configs(cfg):
        check_backbone(rc.classifier.backbone)


def recipe_configs(cfg: Config) -> list[Config]:
    """One config per classifier recipe: each mapping of `pipeline.recipes` over the classifier section (the
    section alone when there is none). Recipes are told apart by their backbone, which names their run folders."""
    if not cfg.pipeline.recipes:
        return [cfg]
    tree, out = config_to_dict(cfg), []
    for i, recipe in enumerate(cfg.pipeline.recipes):
        fixed = sorted(set(recipe) & {"strategy", "seeds"})
        if fixed:
            raise MVCError(f"pipeline.recipes[{i}]: {', '.join(fixed)} come from pipeline.runs and pipeline.seeds")
        try:
            rc = make_config(tree, {f"classifier.{k}": v for k, v in recipe.items()})
        except MVCError as e:
            raise MVCError(f"pipeline.recipes[{i}]: {e}") from None
        if any(o.classifier.backbone == rc.classifier.backbone for o in out):
            raise MVCError(f"pipeline.recipes: two recipes use backbone {rc.classifier.backbone!r}; run folders are "
                           "named after it, so give each recipe its own backbone")
        out.append(rc)
    return out


def run_config(cfg: Config, strategy: str, augment: str, seed: int) -> Config:
    """The config of one classifier run of the pipeline: its strategy, augmentation and seed."""
    return dataclasses.replace(cfg, classifier=dataclasses.replace(cfg.classifier, strategy=strategy, augment=augment,
                                                                   seeds=[seed]))


def generator_config(cfg: Config, method: str, main: bool = False) -> Config:
    """The pipeline's config for the set of one generator: `generate.method` set to it. The main set keeps the
    user's output folders; any other set goes to its method's own default folders (synthetic_<method>/) and
    its classifiers read it there."""
    g = dataclasses.replace(cfg.generate, method=method)
    c = cfg.classifier
    if not main:
        g = dataclasses.replace(g, out_dir=None, grid_dir=None)
        c = dataclasses.replace(c, synthetic_dir=None)
    return dataclasses.replace(cfg, generate=g, classifier=c)


def extra_generators(cfg: Config) -> list[Config]:
    """The configs of the generators of pipeline.generators after the first (the main set)."""
    return [generator_config(cfg, m) for m in cfg.pipeline.generators[1:]]


def split_long(spec: str) -> tuple[str, str | None]:
    """'strategy[+augment][@generator]' -> (run, generator or None)."""
    run, _, gen = spec.partition("@")
    return run, (gen or None)


def long_budget(cfg: Config) -> Config:
    """The config of the long runs: pipeline.long_factor times the classifier's budget (steps, else epochs), with
    a run tag naming the budget (`steps1000`), so their folders never meet the main runs'."""
    c, f = cfg.classifier, cfg.pipeline.long_factor
    if c.steps is not None:
        c = dataclasses.replace(c, steps=c.steps * f, run_tag=f"steps{c.steps * f}")
    else:
        c = dataclasses.replace(c, epochs=c.epochs * f, run_tag=f"epochs{c.epochs * f}")
    return dataclasses.replace(cfg, classifier=c)


def long_runs(cfg: Config) -> list[tuple[Config, str]]:
    """(config of the set, run) of every long run: pipeline.long_runs at the long budget, on the main set unless
    the run names another generator; [] when pipeline.long_factor is 0."""
    if not cfg.pipeline.long_factor:
        return []
    main = cfg.pipeline.generators[0]
    out = []
    for spec in cfg.pipeline.long_runs:
        run, gen = split_long(spec)
        gc = generator_config(cfg, gen or main, main=(gen or main) == main)
        out.append((long_budget(gc), run))
    return out


def needs_finetuning(cfg: Config) -> bool:
    """Whether a generator of the pipeline samples the fine-tuned MVC model (mvc, mvc_nomix)."""
    from mvc.generation.generators import GENERATORS

    return any(GENERATORS.get(m).finetuned for m in cfg.pipeline.generators)


def classifier_run_dir(cfg: Config, strategy: str, augment: str, seed: int) -> Path:
    """The folder train_classifier.py writes for one (strategy, augment, seed) (named by `describe_run`)."""
    from mvc.classifier.outputs import run_dir_for

    return run_dir_for(run_config(cfg, strategy, augment, seed), seed)
