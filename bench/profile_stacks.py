"""Where a whole run's wall time goes: a sampled stack profile of it, summed by stage and by the part of each stage.

    py-spy record --rate 20 --format raw -o demo.raw -- .venv/bin/python run_pipeline.py --config configs/tiny.yaml
    .venv/bin/python bench/profile_stacks.py demo.raw --rate 20 [--out profile.md]

Reads py-spy's collapsed stacks ("frame;frame;... count" per line, outermost frame first) of the main thread, files
every sample under the pipeline stage it was taken in (run_pipeline's stage functions) and the part of that stage
(`COMPONENTS`, what was built or run, and `ACTIVITIES`, what it was doing), and prints minutes (samples / rate)
per stage and part.
docs/profile.md shows a profile of `make demo` and how it was taken.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from run_pipeline import STAGE_NAMES  # noqa: E402

# the stage of a sample: the run_pipeline function it runs under (outermost match), by run_pipeline's own names
STAGES = [*STAGE_NAMES.items(), ("write_results", "report"), ("update_readme", "report")]

# what a sample is part of: the first COMPONENT (what is being built or run; the specific ones come first) that a
# frame of its stack matches, and the innermost frame that matches an ACTIVITY (what it was doing)
COMPONENTS = [
    (r"^get_reference ", "reference classifier (built on first use)"),
    (r"^classification_accuracy_score ", "CAS classifier"),
    (r"^train_selectors ", "curation selectors"),
    (r"^(load_splits|build_dataset) ", "dataset files"),
    (r"^caption_dataset ", "captions (attribute captioner)"),
    (r"^pool_images ", "tiny base: pool images (decode + resize)"),
    (r"^pretrain_vae ", "tiny base: VAE pretraining"),
    (r"^encode_latents ", "tiny base: latents of the pool"),
    (r"^pretrain_unet ", "tiny base: U-Net pretraining"),
    (r"^_save_base ", "tiny base: save + sample grid"),
    (r"^get_tiny_base ", "tiny base: other"),
    (r"^(build_pairs|load_pairs) ", "pairs"),
    (r"^finetune \(mvc/diffusion/finetune_loop", "MVC fine-tuning"),
    (r"^concept_groups ", "clustering"),
    (r"^generate_synthetic ", "generation"),
    (r"^evaluate_set ", "synthetic-set metrics"),
    (r"^run_classifier ", "classifier runs"),
    (r"^(write_results|update_readme) ", "report"),
]
ACTIVITIES = [
    (r"^_find_and_load ", "imports"),
    (r"^(\S+\.)?run_backward |^_engine_run_backward ", "backward"),
    (r"^(Adam|AdamW|Optimizer)\.\w+ |^_fused_adam|^adam ", "optimizer"),
    (r"^(save_checkpoint|PartialBuild\.save|_save_folder|save_pretrained) ", "checkpoint / model writes"),
    (r"^validation_grid ", "validation grids"),
    (r"^(measure_test|evaluate_epoch|evaluate|predict_logits|features_and_probs) ", "evaluation passes"),
    (r"^(plan_loader|Collate\.\w+|Prepared\.\w+|_MultiProcessingDataLoaderIter|_SingleProcessDataLoaderIter)",
     "data loading"),
    (r"^(RunLogger\.\w+|SummaryWriter\.\w+) ", "logging (TensorBoard, jsonl)"),
    (r"^(write_run_outputs|confusion_figure|write_grids|sample_grid) ", "figures + records"),
    (r"^\w*Pipeline\.__call__ ", "diffusion sampling"),
    (r"^(build_model|build_run|build_tiny_components|load_pipeline_components) ", "model build / load"),
]


def parse(lines) -> list[tuple[list[str], int]]:
    """(frames outermost first, count) of every collapsed-stack line."""
    out = []
    for line in lines:
        line = line.rstrip("\n")
        if not line or " " not in line:
            continue
        stack, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        out.append((stack.split(";"), n))
    return out


def stage_of(frames: list[str]) -> str:
    """The run_pipeline stage a stack runs under ('outside the stages' before the first and after the last)."""
    for f in frames:
        for fn, name in STAGES:
            if f.startswith(fn + " "):
                return name
    return "outside the stages (start-up, config, report)"


def _first(frames: list[str], table: list[tuple[str, str]]) -> str | None:
    """The name of the first entry of `table` that some frame matches."""
    for pat, name in table:
        if any(re.search(pat, f) for f in frames):
            return name
    return None


def _innermost(frames: list[str], table: list[tuple[str, str]]) -> str | None:
    """The name of the innermost frame's match in `table`."""
    for f in reversed(frames):
        for pat, name in table:
            if re.search(pat, f):
                return name
    return None


def part_of(frames: list[str]) -> str:
    """'component / activity' of a stack (either alone when the other is not found; 'other' when neither is)."""
    component = _first(frames, COMPONENTS)
    activity = _innermost(frames, ACTIVITIES)
    return " / ".join(x for x in (component, activity) if x) or "other"


def profile(stacks: list[tuple[list[str], int]], rate: float) -> dict[str, dict[str, float]]:
    """{stage: {part: seconds}} of the main thread's stacks (the ones rooted in the script's module frame)."""
    table: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for frames, n in stacks:
        if frames and frames[0].startswith("<module> "):
            table[stage_of(frames)][part_of(frames)] += n / rate
    return {s: dict(p) for s, p in table.items()}


def render(table: dict[str, dict[str, float]], top: int) -> str:
    """A Markdown table: each stage's total, then its largest parts."""
    total = sum(sum(p.values()) for p in table.values())
    lines = [f"Sampled wall time: {total / 60:.1f} min.", "", "| stage / part | minutes | share |", "|---|---|---|"]
    for stage, parts in sorted(table.items(), key=lambda kv: -sum(kv[1].values())):
        s = sum(parts.values())
        lines.append(f"| **{stage}** | **{s / 60:.2f}** | **{100 * s / total:.1f}%** |")
        ranked = sorted(parts.items(), key=lambda kv: -kv[1])
        for part, sec in ranked[:top]:
            lines.append(f"| &nbsp;&nbsp;{part} | {sec / 60:.2f} | {100 * sec / total:.1f}% |")
        rest = sum(sec for _, sec in ranked[top:])
        if rest > 0:
            lines.append(f"| &nbsp;&nbsp;(the rest) | {rest / 60:.2f} | {100 * rest / total:.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("raw", help="py-spy's --format raw output (collapsed stacks)")
    p.add_argument("--rate", type=float, default=100.0, help="the sampling rate it was recorded at (--rate)")
    p.add_argument("--top", type=int, default=8, help="parts shown per stage")
    p.add_argument("--out", help="also write the table to this Markdown file")
    args = p.parse_args(argv)
    path = Path(args.raw)
    if not path.is_file():
        sys.exit(f"error: no file {path}")
    stacks = parse(path.read_text(errors="replace").splitlines())
    if not stacks:
        sys.exit(f"error: {path} holds no collapsed stacks (record with py-spy's --format raw)")
    text = render(profile(stacks, args.rate), args.top)
    print(text)
    if args.out:
        from mvc.core.utils import atomic_write_text

        atomic_write_text(Path(args.out), text)
    return text


if __name__ == "__main__":
    main()
