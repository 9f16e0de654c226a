"""Run every benchmark in bench/ and write bench/RESULTS.md from their JSON results.

    python bench/run_all.py            # all benchmarks
    python bench/run_all.py pairs loader   # only bench_pairs.py and bench_loader.py (other sections kept)

Each bench_<name>.py prints its own table and writes bench/results/<name>.json with a
"title", a "rows" list of dicts, and optional "notes"; this script collates them.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def run(names: list[str]) -> int:
    """Run the selected benchmarks one after another (each in its own process, for clean peak memory)."""
    scripts = sorted(HERE.glob("bench_*.py"))
    if names:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in names]
    if not torch.cuda.is_available():  # bench_gpu.py measures CUDA levers at SD-1.5's width (--quick: its test)
        scripts = [s for s in scripts if s.stem != "bench_gpu"]
    failed = 0
    for s in scripts:
        print(f"\n##### {s.name}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, str(s)], cwd=ROOT)
        print(f"({s.name}: exit {rc}, {time.perf_counter() - t0:.0f} s)", flush=True)
        failed += rc != 0
    return failed


def table(rows: list[dict]) -> list[str]:
    """A markdown table of a list of dicts (columns from the first row)."""
    if not rows:
        return ["(no rows)"]
    cols = list(rows[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return out


def summarize() -> Path:
    """Collate bench/results/*.json into bench/RESULTS.md. A section whose benchmark did not run this time
    (no JSON here) keeps its earlier figures, so `run_all.py evaluation` updates one section only."""
    out = HERE / "RESULTS.md"
    sections: dict[str, list[str]] = {}
    if out.is_file():  # the earlier sections, by title
        title = None
        for line in out.read_text().splitlines():
            if line.startswith("## "):
                title = line[3:]
                sections[title] = []
            elif title is not None:
                sections[title].append(line)
    for path in sorted((HERE / "results").glob("*.json")):
        res = json.loads(path.read_text())
        body = [""] + table(res.get("rows", [])) + [""]
        body += [f"- {n}" for n in res.get("notes", [])] + [""]
        sections[res.get("title", path.stem)] = body
    lines = ["# Benchmarks", "",
             f"Written by `python bench/run_all.py`, last on {time.strftime('%Y-%m-%d')}: {platform.machine()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
             f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU only'}. "
             "Ratios are measured side by side in one run.", ""]
    for title, body in sections.items():
        while body and not body[-1].strip():
            body = body[:-1]
        lines += [f"## {title}"] + body + [""]
    out.write_text("\n".join(lines).rstrip() + "\n")
    print(f"\nwrote {out}")
    return out


if __name__ == "__main__":
    failures = run(sys.argv[1:])
    summarize()
    sys.exit(1 if failures else 0)
