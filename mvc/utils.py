"""Small helpers shared by every stage: user-facing errors, atomic files and folders, names, logging."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

#################################################################################
#                                  Errors                                       #
#################################################################################

class MVCError(Exception):
    """An error the user can act on: scripts print its message as one line and exit 2."""


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> None:
    """Run a script's `main(argv)`, turning `MVCError` into one line on stderr and exit code 2."""
    try:
        main(argv)
    except MVCError as e:
        _close_progress_bars()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        _close_progress_bars()
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        sys.exit(130)


def _close_progress_bars() -> None:
    """Close the tqdm bars an exception left open, so the message after them starts on its own line."""
    if "tqdm" not in sys.modules:
        return
    from tqdm.std import tqdm

    bars = set()
    for cls in {tqdm, *tqdm.__subclasses__()}:  # tqdm.auto's class may keep its own instance set
        bars.update(getattr(cls, "_instances", ()))
    for bar in bars:
        try:
            bar.close()
        except Exception:  # a bar whose stream is gone must not hide the error
            pass


#################################################################################
#                                Atomic files                                   #
#################################################################################

@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed onto `path`, on error removed.

    Readers therefore see either the old file or the complete new one, never a half-written file.
    The temporary name keeps the file's suffix so that writers which dispatch on it (PIL) work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix or path.suffix or ".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def repair_torn_tail(path: str | os.PathLike) -> None:
    """Cut a torn last line (no trailing newline) left by a crash, so appends start on a fresh line."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
    data = path.read_bytes()
    with open(path, "wb") as f:
        f.write(data[: data.rfind(b"\n") + 1])  # everything up to the last complete line
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder next to `path`; on success it replaces `path`, on error it is removed.

    The temporary name carries the process id, so a concurrent writer of the same folder is never
    disturbed; `clean_stale_temps` removes the leftovers of killed writers.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def clean_stale_temps(folder: str | os.PathLike, name: str) -> None:
    """Remove `.name.tmp-<pid>` / `.name.old-<pid>` folders of `atomic_dir` whose process is gone."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in folder.glob(f".{name}.*-*"):
        kind, _, pid = p.name[len(name) + 2:].partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether a process with this id runs (on this machine)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def append_jsonl(path: str | os.PathLike, *records: dict) -> None:
    """Append JSON lines and flush them to disk (a crash loses at most the lines being written).

    A torn last line left by an earlier crash is cut first, so a new line never follows a broken one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    repair_torn_tail(path)
    with open(path, "a") as f:
        f.write("".join(json.dumps(r, default=str) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file, skipping a truncated last line left by a crash."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # torn final line from an interrupted write
                break
            raise MVCError(f"{path}: line {i + 1} is not valid JSON; fix or delete the file")
    return out


#################################################################################
#                              Names and hashes                                 #
#################################################################################

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str, max_len: int = 80) -> str:
    """A file-system-safe version of `name` (no separators, no dot-dot, never empty)."""
    s = _UNSAFE.sub("_", str(name)).strip("._")
    if not s:
        s = "_" + hashlib.sha1(str(name).encode()).hexdigest()[:8]
    if len(s) > max_len:
        s = s[: max_len - 9] + "_" + hashlib.sha1(str(name).encode()).hexdigest()[:8]
    return s


def safe_join(root: str | os.PathLike, *parts: str) -> Path:
    """Join `parts` under `root`, refusing any result that escapes `root`."""
    root = Path(root).resolve()
    out = root.joinpath(*parts).resolve()
    if out != root and root not in out.parents:
        raise MVCError(f"refusing to write outside {root}: {'/'.join(parts)!r}")
    return out


def fingerprint(*items: Any) -> str:
    """A short, stable hash of JSON-serialisable items (or numpy arrays)."""
    h = hashlib.sha256()
    for it in items:
        if isinstance(it, np.ndarray):
            h.update(str(it.dtype).encode() + str(it.shape).encode())
            h.update(np.ascontiguousarray(it).tobytes())
        else:
            h.update(json.dumps(it, sort_keys=True, default=str).encode())
        h.update(b"|")
    return h.hexdigest()[:16]


#################################################################################
#                                  Logging                                      #
#################################################################################

class RunLogger:
    """Log scalars and images once, to two places: TensorBoard and a JSON-lines file.

    Disabled (a no-op) on non-main processes, so callers need not check the rank.
    """

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, jsonl_name: str = "log.jsonl"):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.jsonl = self.run_dir / jsonl_name
        self._tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"))

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        """Log a dict of scalars at `step`."""
        if not self.enabled:
            return
        rec = {"step": int(step)}
        for k, v in values.items():
            v = float(v)
            self._tb.add_scalar(f"{prefix}{k}", v, step)
            rec[f"{prefix}{k}"] = v if math.isfinite(v) else str(v)
        append_jsonl(self.jsonl, rec)

    def image(self, tag: str, image, step: int, path: str | os.PathLike | None = None) -> None:
        """Log a PIL image to TensorBoard, and to `path` on disk when given."""
        if not self.enabled:
            return
        arr = np.asarray(image.convert("RGB"))
        self._tb.add_image(tag, arr, step, dataformats="HWC")
        if path is not None:
            with atomic_path(path) as tmp:
                image.save(tmp)

    def figure(self, tag: str, fig, step: int, path: str | os.PathLike | None = None) -> None:
        """Log a matplotlib figure to TensorBoard and to `path` (PNG) when given."""
        if not self.enabled:
            return
        if path is not None:
            with atomic_path(path) as tmp:
                fig.savefig(tmp, dpi=120, bbox_inches="tight")
        self._tb.add_figure(tag, fig, step, close=False)

    def config(self, config: dict, metrics: dict[str, float] | None = None) -> None:
        """Record a run's resolved config in TensorBoard: as YAML text, and as hparams (flattened keys) so
        that runs compare in its HParams view against `metrics` (tags of scalars this run logs)."""
        if not self.enabled:
            return
        import yaml
        from torch.utils.tensorboard.summary import hparams

        self._tb.add_text("config", "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in flatten(config).items()}
        exp, ssi, sei = hparams(flat, {tag: 0.0 for tag in (metrics or {})})
        for summary in (exp, ssi, sei):
            self._tb.file_writer.add_summary(summary)

    def close(self) -> None:
        """Flush and close TensorBoard."""
        if self._tb is not None:
            self._tb.close()


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1} (a nested config as dotted keys)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def image_grid(rows: list[list], pad: int = 2, bg: int = 255):
    """Paste a list of rows of PIL images into one grid image (cells sized by the first image)."""
    from PIL import Image

    w, h = rows[0][0].size
    ncol = max(len(r) for r in rows)
    grid = Image.new("RGB", (ncol * (w + pad) + pad, len(rows) * (h + pad) + pad), (bg, bg, bg))
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            grid.paste(im.convert("RGB").resize((w, h)), (pad + j * (w + pad), pad + i * (h + pad)))
    return grid


def batched(items: Iterable, n: int) -> Iterator[list]:
    """Yield lists of at most `n` consecutive items."""
    buf = []
    for it in items:
        buf.append(it)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf
