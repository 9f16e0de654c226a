"""Where a tiny-profile classifier step goes: the loader (crop, flip, normalise, collate) vs the model's
forward, backward and optimizer step; ours (small maps convolved as matrix products) against plain oneDNN
convolutions, and in channels-last memory format.

    .venv/bin/python bench/bench_classifier_step.py [--backbone resnet10t --size 32 --batch 50 --steps 40 --repeats 3]

The tiny profile trains every classifier run for 200 steps of 50 images at 32 px (`configs/tiny.yaml`), and a
comparison of every generator trains about 150 of them, so this step is most of `make compare`'s wall time.
The model, optimizer and augmentation are the classifier package's own (`build_model`, `build_optimizer`,
`Augment`); the variants run interleaved, `--repeats` times, and the median is reported, so background load
hits them alike. "plain convs" turns the model's `SmallMapConv2d` layers back into `nn.Conv2d` (the step before
this lever); "channels_last" is ours with channels-last weights and inputs (`classifier.channels_last`, on by
default, converts the weights only; the convolutions then hand channels-last activations on).
Writes bench/results/classifier_step.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mvc.core.utils import atomic_write_json  # noqa: E402

OUT = ROOT / "bench" / "results" / "classifier_step.json"


def timed(fn, steps: int) -> float:
    """Mean seconds per call of `fn` over `steps` calls (after two warm-up calls)."""
    for _ in range(2):
        fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="resnet10t")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    from mvc.classifier.augment import Augment
    from mvc.classifier.engine import build_optimizer
    from mvc.classifier.models import build_model, use_small_map_convs
    from mvc.core.config import ClassifierConfig

    torch.manual_seed(0)
    cfg = ClassifierConfig(backbone=args.backbone, input_size=args.size, batch_size=args.batch)
    raw = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8)
    y = torch.randint(0, 10, (args.batch,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def setup(variant: str):
        torch.manual_seed(0)
        model, meta = build_model(args.backbone, 10, False, False, args.size, channels_last=variant == "channels_last")
        use_small_map_convs(model, enabled=variant != "plain convs")
        model.train()
        return model, build_optimizer(model.parameters(), cfg), meta

    def step_fn(model, opt, variant: str, x):
        def step():
            inp = x.contiguous(memory_format=torch.channels_last) if variant == "channels_last" else x
            loss = loss_fn(model(inp), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    variants = ("ours", "plain convs", "channels_last")
    built = {n: setup(n) for n in variants}
    augment = Augment(built["ours"][2], "standard")  # the model's preprocessing (the same for every variant)
    x = augment(raw)
    times: dict[str, list[float]] = {"loader (augment + normalise)": []} | {f"train step ({n})": [] for n in variants}
    for _ in range(args.repeats):
        times["loader (augment + normalise)"].append(timed(lambda: augment(raw), args.steps))
        for n in variants:
            model, opt, _ = built[n]
            times[f"train step ({n})"].append(timed(step_fn(model, opt, n, x), args.steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["train step (ours)"]
    rows = [{"part": k, "ms_per_step": round(1000 * v, 2), "vs_our_train_step": round(v / base, 3)}
            for k, v in med.items()]
    for r in rows:
        print(f"{r['part']:>32}  {r['ms_per_step']:>8} ms  x{r['vs_our_train_step']}")
    notes = [f"{args.backbone} at {args.size} px, batch {args.batch}, 'standard' augmentation, fused Adam; "
             f"torch threads {torch.get_num_threads()}; median of {args.repeats} interleaved repeats of "
             f"{args.steps} steps. A tiny run is 200 such steps (plus the loader), so our step alone is "
             f"{200 * base:.1f} s of a run; plain convolutions take "
             f"{med['train step (plain convs)'] / base:.2f}x as long."]
    atomic_write_json(Path(args.out), {"title": "Classifier step: loader vs model; small-map convolutions, "
                                                "plain convolutions, channels-last",
                                       "rows": rows, "notes": notes})
    print(notes[0])
    return {"rows": rows, "notes": notes}


if __name__ == "__main__":
    main()
