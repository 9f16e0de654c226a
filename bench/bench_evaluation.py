"""Synthetic-set evaluation: how long the reference classifier takes to train, and to judge a set.

    .venv/bin/python bench/bench_evaluation.py [--config configs/tiny.yaml] [--images 800]

- reference: `mvc_refcnn` (the tiny profile's `evaluate.*` settings) trained from scratch on all 60,000
  Fashion-MNIST training images, measured on the 10,000 test images (target: at most 3 minutes on 2 cores);
- judging: `evaluate_set` without CAS on a set of `--images` images (copies of test images, written by
  the synthetic-set format's writer), features of the set, of the real comparison images and of the
  labelled subset included (target: at most 30 s for 800 images).
The reference is trained into a temporary cache, so an existing cache does not hide the cost.
Writes bench/results/evaluation.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mvc.core.utils import atomic_write_json  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    p.add_argument("--images", type=int, default=800)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "evaluation.json"))
    args = p.parse_args()

    import torch
    from accelerate import Accelerator

    from mvc.core.config import load_yaml, make_config
    from mvc.data import load_splits
    from mvc.data.synthetic import Job, SyntheticSet, class_folder, make_record
    from mvc.evaluation.evaluate import evaluate_set, load_reference

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = make_config(load_yaml(args.config), {"run.output_dir": str(tmp / "run"),
                                                   "evaluate.cache_dir": str(tmp / "ref")})
        acc = Accelerator(cpu=not torch.cuda.is_available())
        splits = load_splits(cfg.data)
        t0 = time.perf_counter()
        ref = load_reference(cfg, acc, progress=False)
        t_ref = time.perf_counter() - t0
        test = splits[2]
        s = SyntheticSet(tmp / "set")
        s.prepare({"method": "bench", "seed": 0}, test.classes)
        jobs = []
        for i in range(args.images):
            y = int(test.targets[i])
            j = Job(i, y, test.classes[y], class_folder(y, test.classes[y], len(test.classes)), i, f"t/{i}", 0, "none")
            s.save_image(test.load_image(i), j)
            s.append(0, make_record(j, method="bench"))
            jobs.append(j)
        s.reconcile(jobs)
        t0 = time.perf_counter()
        rec = evaluate_set(cfg, tmp / "set", acc, splits=splits, ref=ref, cas=False, progress=False)
        t_eval = time.perf_counter() - t0
    ev = dataclasses.asdict(cfg.evaluate)
    rows = [
        {"what": f"train the reference ({ev['reference_backbone']}, {ref.info['train_images']} images, "
                 f"{ev['reference_epochs']} epochs)", "seconds": round(t_ref, 1),
         "images_per_s": round(ref.info["train_images"] * ev["reference_epochs"] / t_ref, 1),
         "target_s": 180, "result": f"{100 * ref.info['test_accuracy']:.2f}% test accuracy"},
        {"what": f"evaluate {args.images} images (no CAS; {cfg.evaluate.real_limit} real test images compared)",
         "seconds": round(t_eval, 1), "images_per_s": round(args.images / t_eval, 1), "target_s": 30,
         "result": f"fidelity {100 * rec['fidelity']['overall']:.1f}% (copies of real test images)"},
    ]
    for r in rows:
        print(f"{r['what']}: {r['seconds']} s ({r['images_per_s']} img/s; target <= {r['target_s']} s): {r['result']}")
    atomic_write_json(args.out, {"title": "Synthetic-set evaluation: reference training and judging", "rows": rows,
                                 "notes": [f"{torch.get_num_threads()} torch threads; peak RSS "
                                           f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"]})


if __name__ == "__main__":
    main()
