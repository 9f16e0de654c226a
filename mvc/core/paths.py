"""Where a run's files go: one place that names every path under `run.output_dir`.

`RunPaths.of(cfg)` names the captions, pairs, clusters, fine-tuning, DreamBooth and textual-inversion folders,
the synthetic sets and their grids, the classifier runs and the report (docs/architecture.md, "Files a run
writes", shows the tree). Output options given as relative paths are taken inside `run.output_dir` and may not
leave it; an absolute path is used as given (the user asked for that place on purpose). No output may lie
inside `data.root`: the run's folders would become part of the dataset (new "classes") the next time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mvc.core.utils import MVCError


def curation_tag(filters) -> str:
    """The name a curated set's folder and its classifier runs carry: `curated_easy_wrong` (the filters sorted, so
    one set of filters is one folder however the list is written); '' without filters."""
    return "curated_" + "_".join(sorted(set(filters))) if filters else ""


def output_path(root: Path, value: str | None, default: str, key: str) -> Path:
    """`value` (an output option) resolved against the run folder `root`; `default` when unset."""
    if value is None or value == "":
        return root / default
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    resolved = (root / p).resolve()
    if resolved != root.resolve() and root.resolve() not in resolved.parents:
        raise MVCError(f"{key}={value!r} leaves run.output_dir ({root}); give a path inside it, or an absolute path")
    return root / p


@dataclass(frozen=True)
class RunPaths:
    """Every path of a run, from its config (`RunPaths.of(cfg)`)."""
    root: Path
    mvc: Path
    final: Path
    synthetic: Path
    grids: Path
    results_csv: Path
    report: Path
    suffix: str = ""  # "_clusters" with clustering-based sampling: the folders of what is learned from the kept images

    @classmethod
    def of(cls, cfg: Any) -> "RunPaths":
        """The paths named (or defaulted) by a config; an empty run folder is refused (it would be the current one)."""
        if not str(cfg.run.output_dir or "").strip():
            raise MVCError("run.output_dir is empty: name the folder the run writes into (e.g. outputs/tiny); an "
                           "empty value would scatter the run's files over the current folder")
        root = Path(cfg.run.output_dir).expanduser()
        g = cfg.generate
        # clustering-based sampling fine-tunes and generates from other images: its own folders, never mixed
        suffix = "_clusters" if cfg.sampling.method == "clusters" else ""
        default = ("synthetic" if g.method == "mvc" else f"synthetic_{g.method}") + suffix  # each generator its own
        if cfg.curation.filters:  # a curated set is another set: its own folder, one per set of filters
            default += "_" + curation_tag(cfg.curation.filters)
        synthetic = output_path(root, g.out_dir, default, "generate.out_dir")
        grids = (output_path(root, g.grid_dir, "", "generate.grid_dir") if g.grid_dir
                 else synthetic.parent / f"{synthetic.name}_grids")
        mvc = root / f"mvc{suffix}"
        final = Path(g.model_dir).expanduser() if g.model_dir else mvc / "final"
        return cls(root=root, mvc=mvc, final=final, synthetic=synthetic, grids=grids, suffix=suffix,
                   results_csv=output_path(root, cfg.classifier.results_csv, "results.csv", "classifier.results_csv"),
                   report=output_path(root, cfg.pipeline.report, "results.md", "pipeline.report"))

    def check_outputs(self, cfg: Any) -> None:
        """Refuse (one line) a run folder that is a file, cannot be created or written, or an output that lies
        inside the data root; called when a stage starts, before it writes anything."""
        for key in ("tiny.cache_dir", "evaluate.cache_dir"):  # shared caches: an empty one is the current folder
            section, name = key.split(".")
            if not str(getattr(getattr(cfg, section), name) or "").strip():
                raise MVCError(f"{key} is empty: name the cache folder (e.g. outputs/cache/{'tiny_base' if section == 'tiny' else 'reference'}); "
                               "an empty value would write the cache into the current folder")
        data = Path(cfg.data.root).expanduser().resolve()
        outputs = {"run.output_dir": self.root, "generate.out_dir": self.synthetic, "generate.grid_dir": self.grids,
                   "classifier.results_csv": self.results_csv, "pipeline.report": self.report,
                   "tiny.cache_dir": Path(cfg.tiny.cache_dir).expanduser(),
                   "evaluate.cache_dir": Path(cfg.evaluate.cache_dir).expanduser()}
        for key, path in outputs.items():
            where = path.resolve()
            if where == data or data in where.parents:
                raise MVCError(f"{key} {str(path)!r} lies inside data.root {str(data)!r}: the run's files would become "
                               "part of the dataset; put the outputs elsewhere")
        syn, grids = self.synthetic.resolve(), self.grids.resolve()
        if grids == syn or syn in grids.parents:  # its PNGs and tb/ would become files (and a class) of the set
            raise MVCError(f"generate.grid_dir {str(self.grids)!r} lies inside the synthetic set {str(self.synthetic)!r}; "
                           "put the grids beside it")
        root = self.root
        if root.exists() and not root.is_dir():
            raise MVCError(f"run.output_dir {str(root)!r} is a file, not a folder; set another run.output_dir")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MVCError(f"cannot create run.output_dir {str(root)!r}: {e.strerror}; set another one") from None
        if not os.access(root, os.W_OK | os.X_OK):
            raise MVCError(f"run.output_dir {str(root)!r} is not writable; set another one or fix its permissions")

    def config_file(self, stage: str) -> Path:
        """The resolved config of one stage run."""
        return self.root / f"config-{stage}.yaml"

    @property
    def captions(self) -> Path:
        return self.root / "captions"

    @property
    def pairs(self) -> Path:
        return self.root / "pairs.npz"

    @property
    def clusters(self) -> Path:
        return self.root / "clusters"

    @property
    def checkpoints(self) -> Path:
        return self.mvc / "checkpoints"

    @property
    def textual_inversion(self) -> Path:
        return self.root / f"textual_inversion{self.suffix}"

    @property
    def dreambooth(self) -> Path:
        return self.root / f"dreambooth{self.suffix}"

    @property
    def classifier(self) -> Path:
        return self.root / "classifier"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def stage_times(self) -> Path:
        return self.root / "stage_times.json"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation"
