"""Small helpers shared by every stage: user-facing errors, atomic files and folders, names, logging."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import reprlib
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

#################################################################################
#                                  Errors                                       #
#################################################################################

class MVCError(Exception):
    """An error the user can act on: scripts print its message as one line and exit 2."""


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> None:
    """Run a script's `main(argv)`, turning `MVCError` into one line on stderr and exit code 2.

    A file-system refusal (permission, read-only or full disk) is the user's environment, not a bug:
    it gets the same one line, naming the file."""
    try:
        main(argv)
    except MVCError as e:
        _fail(str(e))
    except OSError as e:
        if e.errno not in _ENVIRONMENT_ERRNOS:
            raise
        where = f" {e.filename!r}" if e.filename else ""
        _fail(f"cannot write or read{where}: {e.strerror}; check the folder's permissions and free space")
    except KeyboardInterrupt:
        _close_progress_bars()
        print("interrupted: run the command again to continue (with --resume latest for train_mvc.py and "
              "train_classifier.py)", file=sys.stderr)
        sys.exit(130)


# errno values that mean "the machine refuses", whatever the code does: reported in one line
_ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # the disk, the quota or the file-size limit is reached
# what torch's zip writer says when the OS refused a write (it reports no errno)
_TORCH_WRITE_FAILED = ("unexpected pos", "file write failed", "PytorchStreamWriter failed writing")
MAX_MESSAGE = 2000  # characters of an error line; longer ones are cut (a message must stay readable)


def full_disk_error(exc: BaseException, path: str | os.PathLike) -> MVCError | None:
    """The one-line error for a write of `path` that `exc` ended because the disk, the quota or the file-size limit
    is full (ENOSPC, EDQUOT, EFBIG, or torch's writer failing), naming the file and what to free; None for others."""
    if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
        why = ("the file exceeds the file-size limit (ulimit -f) or the file system's largest file"
               if exc.errno == errno.EFBIG else "the disk (or your quota) is full")
    elif isinstance(exc, RuntimeError) and any(s in str(exc) for s in _TORCH_WRITE_FAILED):
        why = "the operating system refused the write (a full disk, quota or file-size limit)"
    else:
        return None
    folder = Path(path).parent
    try:
        free = f"{shutil.disk_usage(folder).free / 1e6:.1f} MB free there"
    except OSError:
        free = "its free space is unknown"
    return MVCError(f"cannot write {str(path)!r}: {why}; {free}: free space in {str(folder)!r} (or point the output "
                    "elsewhere) and run the command again, what was already written is kept and complete")


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` as one printable line: control characters escaped (a name with a newline cannot split it), cut
    to `limit` characters."""
    out = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
    return out if len(out) <= limit else out[: limit - 25] + f"... ({len(out) - limit + 25} more characters)"


def _fail(message: str) -> None:
    """Print `error: <message>` as one line and exit 2."""
    _close_progress_bars()
    print(f"error: {one_line(message)}", file=sys.stderr)
    sys.exit(2)


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
    The temporary name (`.<name>.tmp-<pid>-<random><suffix>`) keeps the file's suffix, so that writers
    which dispatch on it (PIL) work, and the writer's process id, so that `clean_stale_temps` can remove
    what a killed writer left. It is created with mode 0666 less the user's umask, as `open` creates
    files (`tempfile.mkstemp` would give 0600).
    """
    path = Path(path)
    make_parent(path)
    if path.is_dir() and not path.is_symlink():
        raise MVCError(f"cannot write {str(path)!r}: it is a folder")
    suffix = suffix or path.suffix or ".tmp"
    while True:
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}{suffix}"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            break
        except FileExistsError:  # another writer drew the same name: draw again
            continue
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)  # a partial file of a full disk frees its space
        full = full_disk_error(e, path)
        if full is not None:
            raise full from None
        raise


def make_parent(path: Path) -> None:
    """Create the folder of `path`; a file in the way is an MVCError, not a traceback."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise MVCError(f"cannot create the folder of {str(path)!r}: a file is in the way") from None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the file `src` to `dst` atomically (a link at `dst` is replaced, never written through)."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


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
    make_parent(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = full_disk_error(e, path)
        if full is not None:
            raise full from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)(?:-.*)?$")


def clean_stale_temps(folder: str | os.PathLike, name: str | None = None, recursive: bool = False) -> int:
    """Remove the temporary files and folders (`.<name>.tmp-<pid>...`, `.<name>.old-<pid>`) that
    `atomic_path` / `atomic_dir` writers left when they were killed (their process is gone).

    Only entries of `name` when given, else of any name; in sub-folders too when `recursive` (symbolic
    links are never followed). Returns how many were removed.
    """
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return 0
    removed = 0
    for root, dirs, files in os.walk(folder):  # never follows links
        for entry in dirs + files:
            m = _TEMP.match(entry)
            if m is None or (name is not None and m["name"] != name) or _alive(int(m["pid"])):
                continue
            p = Path(root) / entry
            if p.is_symlink():
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.is_file():  # only what our writers make: plain files and folders
                p.unlink(missing_ok=True)
            else:
                continue
            removed += 1
        if not recursive:
            break
        dirs[:] = [d for d in dirs if (Path(root) / d).exists()]  # do not descend into what is gone
    return removed


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
    make_parent(path)
    repair_torn_tail(path)
    data = memoryview("".join(json.dumps(r, default=str) + "\n" for r in records).encode())
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        except OSError as e:
            full = full_disk_error(e, path)
            if full is None:
                raise
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)  # no torn line: the file holds the records it held before
            raise full from None
    finally:
        os.close(fd)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file, skipping a truncated last line left by a crash."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return []
    if not path.is_file():  # a folder, a FIFO (reading it would block), a broken link
        raise MVCError(f"{str(path)!r} is not a plain file; remove it")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise MVCError(f"{str(path)!r} is not UTF-8 text; fix or delete the file") from None
    out = []
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


def truncate_jsonl(path: str | os.PathLike, keep: Callable[[dict], bool]) -> int:
    """Rewrite a JSON-lines file (atomically) with only the records `keep` accepts; returns how many went."""
    path = Path(path)
    records = read_jsonl(path)
    kept = [r for r in records if keep(r)]
    if len(kept) < len(records):
        atomic_write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in kept))
    return len(records) - len(kept)


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


def short_repr(value: Any, limit: int = 60) -> str:
    """`repr(value)`, cut to `limit` characters (an error line names a value, it does not print a huge one)."""
    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlist, r.maxdict, r.maxlevel = limit, limit, 8, 8, 3
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, jsonl_name: str = "log.jsonl",
                 truncate_to: int | None = None):
        """`truncate_to`: the step a (resumed) run continues after; the records and TensorBoard events of
        later steps, which an interrupted run left and this one logs again, are dropped (-1: all of them,
        for a run that starts afresh). None keeps everything."""
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.jsonl = self.run_dir / jsonl_name
        self._tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            purge = None
            if truncate_to is not None:
                truncate_jsonl(self.jsonl, lambda r: int(r.get("step", 0)) <= truncate_to)
                purge = truncate_to + 1  # TensorBoard hides earlier files' events at steps >= this
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=purge)

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

    def figure(self, tag: str, fig, step: int, path: str | os.PathLike | None = None):
        """Log a matplotlib figure to TensorBoard and to `path` (PNG) when given; returns the rendered PIL image
        (None when logging is off). The figure is drawn once: TensorBoard gets the PNG's pixels, since text-heavy
        figures take most of a small classifier run's time to draw."""
        if not self.enabled:
            return None
        import io

        from PIL import Image

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
        if path is not None:
            with atomic_path(path) as tmp:
                Path(tmp).write_bytes(buf.getvalue())
        image = Image.open(io.BytesIO(buf.getvalue()))
        self.image(tag, image, step)
        return image

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
