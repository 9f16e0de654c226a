"""Pair storage: bytes per pair on disk and the time to draw 1,000,000 pairs.

    python bench/bench_pairs.py
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from mvc.data.pairs import build_pairs, load_pairs, save_pairs

OUT = Path(__file__).resolve().parent / "results" / "pairs.json"


def main() -> None:
    """Draw 1M pairs over 10 / 100 / 1000 classes, save, load, and report."""
    rows = []
    n_pairs = 1_000_000
    for num_classes in (10, 100, 1000):
        per_class = 1000 // (num_classes // 10)  # images per class; rounds make 1M pairs in total
        targets = np.repeat(np.arange(num_classes), per_class)
        rounds = n_pairs // len(targets)
        build_pairs(targets, rounds=1, seed=0)  # warm-up
        t0 = time.perf_counter()
        pairs = build_pairs(targets, rounds=rounds, seed=0)
        draw = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "pairs.npz"
            t0 = time.perf_counter()
            save_pairs(path, pairs)
            save = time.perf_counter() - t0
            size = path.stat().st_size
            t0 = time.perf_counter()
            load_pairs(path, pairs.fingerprint)
            load = time.perf_counter() - t0
        rows.append({"classes": num_classes, "images": len(targets), "pairs": len(pairs),
                     "draw_s": draw, "save_s": save, "load_s": load,
                     "MB_on_disk": size / 1e6, "bytes_per_pair": size / len(pairs)})
    for r in rows:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"title": "Pair storage (index pairs only, int32)", "rows": rows,
                               "notes": ["target: 1,000,000 pairs in at most 10 MB"]}, indent=2))


if __name__ == "__main__":
    main()
