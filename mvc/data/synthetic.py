"""The synthetic-set format: its plan, its files, its records; written, reconciled, read and counted here only.

A set is an image folder that torchvision's `ImageFolder` and the `datasets` "imagefolder" loader both read as
it is: `generation.json` (the settings), `metadata.jsonl` (one record per image), `rejected.jsonl` and
`<NNN>_<class>/<SSSSS>_v<VVV>.png`. Every PNG names its set's settings fingerprint, so a rerun touches only its
own files. A PNG is written atomically and its record appended after it; `reconcile` merges the ranks'
records and drops those whose file is gone. docs/synthetic_format.md describes the files and records.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mvc.core.seeds import resolve_seed
from mvc.core.utils import (
    MVCError,
    RunLogger,
    append_jsonl,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    fingerprint,
    image_grid,
    read_jsonl,
    safe_name,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: class folders prefixed by the class index; PNGs marked with the settings
SETTINGS_FILE = "generation.json"
METADATA = "metadata.jsonl"
REJECTED = "rejected.jsonl"
PNG_KEY = "mvc-synthetic"  # the PNG text chunk that marks our images


#################################################################################
#                                    Plan                                       #
#################################################################################

def class_folder(label: int, name: str, num_classes: int) -> str:
    """`<index>_<safe name>`, the index zero-padded so that folders sort in class order."""
    width = max(3, len(str(max(num_classes - 1, 0))))
    return f"{int(label):0{width}d}_{safe_name(name)}"


@dataclass(frozen=True)
class Job:
    """One planned image: its source, variant and op; `index` is its place in the plan."""
    index: int
    label: int
    class_name: str
    folder: str
    source: int  # position of the source image in the labelled subset
    source_id: str
    variant: int
    op: str
    width: int = 5  # digits of the source position in file names

    @property
    def file(self) -> str:
        """Path relative to the set's folder."""
        return f"{self.folder}/{self.source:0{self.width}d}_v{self.variant:03d}.png"


def class_target(n_real: int, multiplier: float | None, per_class: int | None) -> int:
    """Synthetic images for a class with `n_real` labelled images."""
    if per_class is not None:
        return int(per_class)
    if multiplier is None:
        raise MVCError("set generate.multiplier or generate.per_class")
    return int(round(float(multiplier) * n_real))


def variants_per_source(n_sources: int, total: int) -> list[int]:
    """Spread `total` variants over `n_sources` sources: equal shares, the remainder to the first ones."""
    q, r = divmod(int(total), int(n_sources))
    return [q + (1 if i < r else 0) for i in range(n_sources)]


def plan_jobs(labelled: Any, ops: Sequence[str], multiplier: float | None = 4.0,
              per_class: int | None = None, sources: Sequence[int] | None = None,
              totals: dict[int, int] | None = None) -> list[Job]:
    """Every image to make, in a fixed order (class, source, variant); variant v uses ops[v % len(ops)].

    `sources` (labelled positions, optional; clustering-based sampling passes the kept images): only these
    are used as sources. A class's total stays `class_target` of its real count (or `totals[class]`, e.g.
    curation's candidates), spread over its kept sources, which then get more variants each; a larger total
    only adds variants, so a plan's images are part of every larger plan's."""
    ops = list(ops)
    if not ops:
        raise MVCError("mixing.ops is empty; give at least one op, e.g. [coarse, fine] (or [none] for no mixing)")
    jobs: list[Job] = []
    targets = np.asarray(labelled.targets)
    n = len(labelled.classes)
    width = max(5, len(str(max(len(targets) - 1, 0))))
    allowed = None if sources is None else {int(s) for s in sources}
    for c, name in enumerate(labelled.classes):
        real = np.flatnonzero(targets == c).tolist()
        if not real:
            continue
        used = real if allowed is None else [s for s in real if s in allowed]
        if not used:
            raise MVCError(f"class {name!r} has {len(real)} labelled image(s) but none among the sources to use; "
                           "every class needs at least one kept source")
        folder = class_folder(c, name, n)
        total = totals[c] if totals is not None and c in totals else class_target(len(real), multiplier, per_class)
        for s, count in zip(used, variants_per_source(len(used), total)):
            for v in range(count):
                jobs.append(Job(len(jobs), c, name, folder, int(s), str(labelled.ids[s]), v, ops[v % len(ops)], width))
    return jobs


def shard_jobs(jobs: Sequence[Job], rank: int, world: int) -> list[Job]:
    """This process's disjoint share: jobs whose plan index is `rank` modulo `world`."""
    if not 0 <= rank < world:
        raise MVCError(f"rank {rank} is not in 0..{world - 1}")
    return [j for j in jobs if j.index % world == rank]


def make_record(job: Job, **fields: Any) -> dict:
    """The metadata record of one image: its identity in the plan, then the generator's fields."""
    return {"file_name": job.file, "file": job.file, "label": job.label, "class_name": job.class_name,
            "source_id": job.source_id, "source_index": job.source, "variant": job.variant, "op": job.op, **fields}


#################################################################################
#                            The folder and its records                         #
#################################################################################

class SyntheticSet:
    """One synthetic-set folder: its settings, records, images; what a generator run may write."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.settings: dict | None = None

    # ----------------------------------------------------------------- settings
    def prepare(self, settings: dict, classes: Sequence[str]) -> dict:
        """Check (or record) the settings the set is made with and create every class folder.

        A null `seed` in `settings` reuses the recorded one (or draws one for a new set). Returns the
        settings in effect.
        """
        root = self.root
        if root.is_symlink() or (root.exists() and not root.is_dir()):
            raise MVCError(f"synthetic-set folder {str(root)!r} is a file or a link; set another generate.out_dir")
        path = root / SETTINGS_FILE
        if path.is_file():
            try:
                rec = json.loads(path.read_text())
                old = rec["settings"]
                fmt = rec.get("format")
            except (ValueError, KeyError, TypeError):
                raise MVCError(f"{path} is not a synthetic-set settings file; delete the folder or set another "
                               f"generate.out_dir") from None
            if fmt != FORMAT_VERSION:
                raise MVCError(f"{root} was made by an older version (format {fmt}, now {FORMAT_VERSION}); "
                               f"delete it or set another generate.out_dir")
            if settings.get("seed") is None:
                settings = {**settings, "seed": old.get("seed")}
            if fingerprint(old) != fingerprint(settings):
                diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
                raise MVCError(f"{root} holds images made with other settings (differ: {', '.join(diff)}); "
                               f"set another generate.out_dir or delete that folder")
        else:
            if root.is_dir() and any(root.iterdir()):
                raise MVCError(f"{root} exists and was not made by this project ({SETTINGS_FILE} missing); "
                               f"set another generate.out_dir or empty it")
            settings = {**settings, "seed": resolve_seed(settings.get("seed"))}
            root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, {"format": FORMAT_VERSION, "settings": settings,
                                     "fingerprint": fingerprint(settings)})
        for name in (METADATA, REJECTED):
            if (root / name).exists() and not (root / name).is_file() or (root / name).is_symlink():
                raise MVCError(f"{root / name} is not a plain file; remove it")
        for c, name in enumerate(classes):
            d = root / class_folder(c, name, len(classes))
            if d.is_symlink() or (d.exists() and not d.is_dir()):
                raise MVCError(f"{d} is not a plain folder; remove it")
            d.mkdir(exist_ok=True)
        self.settings = settings
        return settings

    @property
    def mark(self) -> str:
        """The PNG text-chunk value that marks images of this set (its settings fingerprint)."""
        if self.settings is None:
            raise RuntimeError("SyntheticSet.prepare() first")
        return fingerprint(self.settings)

    # ------------------------------------------------------------------- writing
    def save_image(self, image: Any, job: Job) -> None:
        """Write one PNG atomically, marked as ours (the unit a crash can interrupt)."""
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text(PNG_KEY, json.dumps({"set": self.mark, "file": job.file}))
        with atomic_path(self.root / job.file) as tmp:
            image.save(tmp, format="PNG", pnginfo=info)

    def append(self, rank: int, record: dict, rejected: bool = False) -> None:
        """Append a record to this rank's part file (after its image exists)."""
        stem = "rejected" if rejected else "metadata"
        append_jsonl(self.root / f"{stem}.rank{rank}.jsonl", record)

    # ------------------------------------------------------------------ ownership
    def is_ours(self, path: Path) -> bool:
        """Whether `path` is a PNG this set wrote (its text chunk names this set)."""
        from PIL import Image

        if path.is_symlink() or not path.is_file() or path.suffix != ".png":
            return False
        try:
            with Image.open(path) as im:
                tag = json.loads(im.text.get(PNG_KEY, "null") if hasattr(im, "text") else "null")
        except Exception:
            return False
        return isinstance(tag, dict) and tag.get("set") == self.mark

    def _own_temp(self, f: Path, planned: set[str]) -> bool:
        """A temp file `atomic_path` left for one of our planned files (`.<name>.<random>.png`)."""
        name = f.name
        return name.startswith(".") and name.endswith(".png") and f.is_file() and not f.is_symlink() and any(
            name.startswith(f".{Path(p).name}.") for p in planned if Path(p).parent.name == f.parent.name)

    # ---------------------------------------------------------------- reconcile
    def _merged(self, stem: str) -> list[dict]:
        lines = read_jsonl(self.root / f"{stem}.jsonl")
        for part in sorted(self.root.glob(f"{stem}.rank*.jsonl")):
            lines.extend(read_jsonl(part))
        return lines

    def reconcile(self, jobs: Sequence[Job]) -> dict:
        """Make the records agree with the files (main process only); returns counts.

        Records whose file is missing or that fall outside the plan are dropped; duplicates keep the
        first; planned images without a record stay to be made (a file of ours there is overwritten).
        Our own temp files and our images outside the plan are deleted; anything else that is not ours
        (a user's file, also one under a planned name, a link, a folder) is refused, never deleted.
        """
        plan = {j.file: j for j in jobs}
        kept: dict[str, dict] = {}
        for rec in self._merged("metadata"):
            f = rec.get("file")
            if f in plan and f not in kept and (self.root / f).is_file():
                kept[f] = rec
        rejected: dict[str, dict] = {}
        for rec in self._merged("rejected"):
            f = rec.get("file")
            if f in plan and f not in kept and f not in rejected and not (self.root / f).is_file():
                rejected[f] = rec
        foreign, stale = [], 0
        for d in sorted(self.root.iterdir()):
            if d.is_symlink():
                foreign.append(d)
            elif d.is_dir():
                for f in sorted(d.iterdir()):
                    rel = f"{d.name}/{f.name}"
                    if self._own_temp(f, set(plan)):
                        f.unlink()
                    elif rel in plan and self.is_ours(f):  # a record is no proof: the file may be a user's now
                        continue
                    elif self.is_ours(f):  # ours, from a larger plan (a smaller multiplier now)
                        f.unlink()
                        stale += 1
                    else:
                        foreign.append(f)
        if foreign:
            shown = ", ".join(repr(str(p.relative_to(self.root))) for p in foreign[:3])
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            raise MVCError(f"{self.root} holds {len(foreign)} file(s) this project did not write ({shown}{more}); "
                           f"move them out or set another generate.out_dir")
        if stale:
            log.warning("removed %d images of ours outside the current plan (a smaller generate.multiplier/per_class)",
                        stale)
        order = lambda recs: sorted(recs.values(), key=lambda r: plan[r["file"]].index)  # noqa: E731
        atomic_write_text(self.root / METADATA, "".join(_dumps(r) for r in order(kept)))
        if rejected or (self.root / REJECTED).exists():
            atomic_write_text(self.root / REJECTED, "".join(_dumps(r) for r in order(rejected)))
        for part in list(self.root.glob("metadata.rank*.jsonl")) + list(self.root.glob("rejected.rank*.jsonl")):
            part.unlink(missing_ok=True)
        return {"images": len(kept), "rejected": len(rejected), "stale_removed": stale}

    def done(self) -> set[str]:
        """Files already made or rejected (after the main process reconciled)."""
        return {r["file"] for r in read_jsonl(self.root / METADATA)} | {r["file"] for r in read_jsonl(self.root / REJECTED)}


def _dumps(rec: dict) -> str:
    return json.dumps(rec, default=str) + "\n"


#################################################################################
#                                Reading, counting                              #
#################################################################################

def _folder_labels(root: Path, classes: Sequence[str]) -> dict[str, int]:
    """Folder name -> class index for a set without records: `NNN_<name>`, the name, or its safe form."""
    out = {}
    for c, name in enumerate(classes):
        for folder in (class_folder(c, name, len(classes)), name, safe_name(name)):
            out.setdefault(folder, c)
    return out


def read_records(root: str | os.PathLike, classes: Sequence[str]) -> list[dict]:
    """The records of the set at `root`, checked against the dataset's classes; a set without
    `metadata.jsonl` (another tool's image folder) gets records from its class folders."""
    from mvc.data.images import IMAGE_EXTENSIONS

    root = Path(root)
    meta = root / METADATA
    recs = []
    if meta.is_file():
        for rec in read_jsonl(meta):
            f = rec.get("file_name", rec.get("file"))
            if not isinstance(f, str) or "label" not in rec:
                raise MVCError(f"{meta}: every line needs 'file_name' and 'label'")
            try:
                label = int(rec["label"])
            except (TypeError, ValueError):
                raise MVCError(f"{meta}: label {rec['label']!r} of {f!r} is not a class index") from None
            if not 0 <= label < len(classes):
                raise MVCError(f"{meta}: label {label} of {f!r} is outside 0..{len(classes) - 1}; "
                               f"was it generated for another dataset?")
            name = rec.get("class_name")
            if name is not None and name != classes[label]:
                raise MVCError(f"{meta}: {f!r} has label {label} = {classes[label]!r} but class_name {name!r}; "
                               f"the synthetic set does not match this dataset")
            path = root / f
            if ".." in Path(f).parts or Path(f).is_absolute() or path.is_symlink() or not path.is_file():
                raise MVCError(f"{meta} lists {f!r}, which is not an image file inside the set; "
                               f"regenerate or fix the metadata")
            recs.append({**rec, "file_name": f, "label": label})
    elif root.is_dir():
        labels = _folder_labels(root, classes)
        for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if sub.name not in labels:
                raise MVCError(f"{sub}: folder does not match any class of the dataset (e.g. "
                               f"{class_folder(0, classes[0], len(classes))!r}); add metadata.jsonl or rename it")
            for f in sorted(sub.iterdir()):
                if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file() and not f.is_symlink():
                    recs.append({"file_name": f"{sub.name}/{f.name}", "label": labels[sub.name], "source_id": None})
    return recs


def load_synthetic_set(root: str | os.PathLike, classes: Sequence[str], exclude_sources: set[str] | None = None):
    """The set at `root` as an `ImageDataset` (empty when the folder does not exist), without images made
    from `exclude_sources` (real ids held out for validation or a test fold, to avoid leakage)."""
    from mvc.data import FileSource, ImageDataset

    recs = read_records(root, classes)
    if exclude_sources:
        kept = [r for r in recs if r.get("source_id") not in exclude_sources]
        if len(kept) < len(recs):
            log.info("dropping %d synthetic images made from held-out real images", len(recs) - len(kept))
        recs = kept
    files = [r["file_name"] for r in recs]
    return ImageDataset("synthetic", "synthetic", list(classes), [r["label"] for r in recs], files,
                        FileSource([Path(root) / f for f in files]))


def read_settings_file(root: str | os.PathLike) -> dict | None:
    """A set's settings file ({"format", "settings", "fingerprint"}), None when it is missing or unreadable."""
    try:
        rec = json.loads((Path(root) / SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def check_provenance(root: str | os.PathLike, labelled: Any, data_root: str | os.PathLike | None = None) -> None:
    """Refuse, in one line naming what differs, a synthetic set that does not belong to a run on `labelled`: one
    generated for other classes or from another labelled subset (its settings file records both), or a folder
    inside `data_root` (the dataset's own real images given as synthetic ones)."""
    root = Path(root)
    if data_root is not None:
        data, where = Path(data_root).expanduser().resolve(), root.resolve()
        if where == data or data in where.parents:
            raise MVCError(f"the synthetic set {str(root)!r} lies inside data.root {str(data)!r}: those are the dataset's "
                           "real images; give a set generate_mvc.py made (classifier.synthetic_dir)")
    settings = (read_settings_file(root) or {}).get("settings")
    if not isinstance(settings, dict):
        return  # another tool's image folder: it records no provenance to compare
    differ = []
    if "classes" in settings and list(settings["classes"]) != list(labelled.classes):
        differ.append(f"classes ({len(settings['classes'])} there, {len(labelled.classes)} here)")
    if "data" in settings and settings["data"] != labelled.fingerprint():
        differ.append("labelled subset (data.name, data.k_per_class or data.subset_seed)")
    if differ:
        raise MVCError(f"the synthetic set {str(root)!r} ({settings.get('method', 'unknown generator')}) was generated "
                       f"for another {' and '.join(differ)} than this run; generate a set for this run, or run with "
                       "the data settings it was made with")


def set_name(root: str | os.PathLike) -> str:
    """A set's name: its folder's name, file-system safe. Its report lives in evaluation/<name>/ and the configs it
    was made and judged with in config-generate_<name>.yaml and config-evaluate_<name>.yaml."""
    return safe_name(Path(root).name)


def set_fingerprint(root: str | os.PathLike) -> str | None:
    """Identifies a set's content: its settings and its records (None without a settings file)."""
    rec = read_settings_file(root)
    if rec is None:
        return None
    meta = Path(root) / METADATA
    return fingerprint(rec.get("fingerprint"), meta.read_text() if meta.is_file() else "")


def count_images(root: str | os.PathLike) -> int:
    """Images listed in the set's metadata (0 when there is none)."""
    return len(read_jsonl(Path(root) / METADATA)) if (Path(root) / METADATA).is_file() else 0


#################################################################################
#                                  Sample grids                                 #
#################################################################################

def _op_rank(op: str) -> int:
    """Grid column order: coarse variants, then fine ones, then the rest."""
    return 0 if op.startswith("coarse") else 1 if op.startswith("fine") else 2


def write_grids(root: Path, grid_dir: Path, labelled: Any, jobs: Sequence[Job], n_sources: int,
                summary: dict) -> None:
    """Per class, rows = sources: real | coarse variants | fine variants; to disk and TensorBoard."""
    from PIL import Image

    logger = RunLogger(grid_dir, truncate_to=-1)  # redrawn for the set as it is now: no record of an earlier run
    try:
        for label, cjobs in groupby(jobs, key=lambda j: j.label):
            by_src: dict[int, list[Job]] = {}
            for j in cjobs:
                if (root / j.file).is_file():
                    by_src.setdefault(j.source, []).append(j)
            rows = []
            for s, js in list(by_src.items())[:n_sources]:
                ims = [Image.open(root / j.file).convert("RGB") for j in sorted(js, key=lambda j: (_op_rank(j.op),
                                                                                                     j.variant))]
                rows.append([labelled.load_image(s).convert("RGB").resize(ims[0].size, Image.BICUBIC)] + ims)
            if rows:
                name = safe_name(labelled.classes[label])
                logger.image(f"grids/{name}", image_grid(rows), 0, path=grid_dir / f"{name}.png")
        logger.scalars(0, {k: v for k, v in summary.items() if isinstance(v, (int, float)) and v is not None},
                       prefix="generate/")
    finally:
        logger.close()
