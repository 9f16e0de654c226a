"""Train a classifier on real (+ synthetic) images and report test metrics; or score images with one.

    python train_classifier.py --config configs/tiny.yaml --strategy two_phase --seeds 0 1 2
    python train_classifier.py --config configs/tiny.yaml --strategy real --resume latest
    torchrun --nproc_per_node 2 train_classifier.py --config configs/tiny.yaml      # DDP (accelerate)
    python train_classifier.py predict --checkpoint outputs/tiny/classifier/<run> --images some/folder
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mvc.core.config import CLIParser, Config, build_parser, parse_args
from mvc.core.utils import MVCError, run_cli


def main(cfg: Config, resume: str | None = None, stop_after: int | None = None) -> list[dict]:
    """Start the stage and train every seed (and fold) of the config; returns the run records."""
    from mvc.classifier.train import run_all
    from mvc.core.stage import start_stage

    stage = start_stage(cfg, "train_classifier", precision_from="classifier")
    records = run_all(cfg, stage.accelerator, resume=resume, stop_after=stop_after)
    if stage.is_main:
        for r in records:
            print(f"{Path(r['run_dir']).name}: last accuracy {r['last']['accuracy']:.4f} "
                  f"(macro F1 {r['last']['f1_macro']:.4f}), best {r['best']['accuracy']:.4f} @ epoch "
                  f"{r['best']['epoch']} [{r['best_selected_on']}], {r['time_s']} s")
    return records


def predict_cli(argv: list[str]) -> None:
    """`predict`: print (or write as JSON lines) the predicted class and probabilities of every image."""
    from mvc.classifier.predict import list_images, load_classifier, predict
    from mvc.core.utils import atomic_write_text
    from mvc.data.images import IMAGE_EXTENSIONS, printable_name

    p = CLIParser(prog="train_classifier.py predict", description="Score an image folder with a checkpoint.")
    p.add_argument("--checkpoint", required=True, help="Checkpoint file, or a classifier run folder (newest checkpoint).")
    p.add_argument("--images", required=True, help="Folder of images (searched recursively).")
    p.add_argument("--out", default=None, help="Write JSON lines {file, pred, class, confidence, probs} here.")
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    if args.batch_size < 1:
        raise MVCError(f"--batch-size must be >= 1, got {args.batch_size}")
    bundle = load_classifier(args.checkpoint)
    files = list_images(args.images)
    if not files:  # a request that scores nothing is a mistake (a wrong folder), not a success
        raise MVCError(f"no images under {args.images!r} (searched recursively for {', '.join(sorted(IMAGE_EXTENSIONS))}); "
                       "give the folder that holds them")
    probs = predict(bundle, files, args.batch_size)
    lines = []
    for f, pr in zip(files, probs):
        k = int(pr.argmax())
        lines.append({"file": str(f), "pred": k, "class": bundle.classes[k], "confidence": float(pr[k]),
                      "probs": [round(float(v), 6) for v in pr]})
    if args.out:
        atomic_write_text(args.out, "".join(json.dumps(r) + "\n" for r in lines))
        print(f"wrote {len(lines)} predictions to {args.out}")
    else:
        for r in lines:
            print(f"{printable_name(r['file'])}\t{r['class']}\t{r['confidence']:.4f}")  # a Latin-1 name: escaped


def cli(argv: list[str] | None = None):
    """Parse the config and flags (or the `predict` subcommand), then run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["predict"]:
        return predict_cli(argv[1:])
    from mvc.classifier.strategies import list_strategies

    parser = build_parser(__doc__.splitlines()[0] + "  (subcommand: `predict --checkpoint X --images DIR`)")
    parser.add_argument("--strategy", default=None, choices=list_strategies(), help="Shortcut for classifier.strategy.")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="Shortcut for classifier.seeds.")
    parser.add_argument("--resume", default=None, help="None (fresh), 'latest', or a checkpoint path.")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="Stop after this many epochs (a checkpoint is written; resume with --resume latest).")
    cfg, args = parse_args(parser, argv, shortcuts={"strategy": "classifier.strategy", "seeds": "classifier.seeds"})
    if args.stop_after is not None and args.stop_after < 1:  # zero epochs would only write an untrained checkpoint
        raise MVCError(f"--stop-after must be at least 1 epoch, got {args.stop_after}; leave it out to train every epoch")
    return main(cfg, resume=args.resume, stop_after=args.stop_after)


def console() -> None:
    """Entry point of the `mvc-classifier` command."""
    run_cli(cli)


if __name__ == "__main__":
    console()
