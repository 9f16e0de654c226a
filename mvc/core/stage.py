"""Starting a stage: every script runs the same three steps, parse -> start -> run.

`start_stage` builds the accelerator, resolves the base seed once for all processes (a null seed is
drawn and then recorded), checks that the outputs can be written where they go
(`RunPaths.check_outputs`), removes the temporary files that writers killed in an earlier run left,
and writes the resolved config into the run folder as `config-<stage>.yaml`; the stage then records
the same config in its TensorBoard log (text and hparams, `RunLogger.config`), so runs compare in
TensorBoard's HParams view.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from mvc.core.config import Config, save_config
from mvc.core.distributed import broadcast_seed, make_accelerator
from mvc.core.paths import RunPaths
from mvc.core.utils import clean_stale_temps


@dataclass
class Stage:
    """What a started stage runs with."""
    name: str
    accelerator: Any
    seed: int
    paths: RunPaths

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)


def check_precisions(cfg: Config) -> None:
    """Refuse, in one line and before any work, a precision setting of `cfg` that this process's device cannot
    compute in: the mixed precisions of fine-tuning and the classifier (accelerate's own when null, which
    DreamBooth and textual inversion train with) and the weight dtypes of generation and captioning. A pipeline
    runs every stage, so it checks them all at its start; each stage checks its own when it starts."""
    import os

    from accelerate import PartialState

    from mvc.core.distributed import check_precision

    device = PartialState().device
    default = os.environ.get("ACCELERATE_MIXED_PRECISION")  # what `accelerate launch --mixed_precision` sets
    for key, value in (("train.mixed_precision", cfg.train.mixed_precision),
                       ("classifier.mixed_precision", cfg.classifier.mixed_precision),
                       ("generate.dtype", cfg.generate.dtype), ("captions.dtype", cfg.captions.dtype)):
        if key == "captions.dtype" and cfg.captions.captioner != "blip2":  # only BLIP-2 has weights to cast
            continue
        if value is None and key.endswith("mixed_precision") and default:
            value, key = default, f"accelerate's mixed precision (for {key})"
        check_precision(value, device, key)


def start_stage(cfg: Config, name: str, precision_from: str | None = None, dtype_from: str | None = None) -> Stage:
    """Accelerator, shared seed (recorded in `cfg.run.seed`), logging, and `config-<name>.yaml` in the run folder.

    `precision_from` names the config section ('train', 'classifier') whose `mixed_precision` (and
    `grad_accum`) the accelerator takes; a null there is accelerate's own setting (`accelerate config`,
    `accelerate launch --mixed_precision ...`). The values in effect are written back into that section,
    so the recorded config says what ran. `dtype_from` names the section ('generate') whose weight `dtype` the
    stage loads its models in; a precision or dtype the device cannot compute in is refused before anything is
    written.
    """
    section = getattr(cfg, precision_from) if precision_from else None
    acc = make_accelerator(getattr(section, "mixed_precision", None), getattr(section, "grad_accum", None),
                           key=f"{precision_from}.mixed_precision" if precision_from else "mixed_precision")
    if dtype_from is not None:
        from mvc.core.distributed import check_precision

        check_precision(getattr(getattr(cfg, dtype_from), "dtype", None), acc.device, f"{dtype_from}.dtype")
    if section is not None:
        section.mixed_precision = str(acc.mixed_precision)
        if hasattr(section, "grad_accum"):
            section.grad_accum = int(acc.gradient_accumulation_steps)
    cfg.run.seed = broadcast_seed(acc, cfg.run.seed)
    paths = RunPaths.of(cfg)
    logging.basicConfig(level=logging.INFO if acc.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    paths.check_outputs(cfg)
    if acc.is_main_process:
        clean_stale_temps(paths.root, recursive=True)  # what writers killed in an earlier run left
        save_config(cfg, paths.config_file(name))
    return Stage(name, acc, cfg.run.seed, paths)
