"""Where does the generator lose the class? Label fidelity stage by stage: real images at the generator's
resolution, the VAE round trip, the base's own text-to-image samples, the fine-tuned model without mixing
over a guidance grid, and each mixing op; judged by the evaluation-only reference classifier.

    .venv/bin/python scripts/diagnose_generator.py --config configs/tiny.yaml
    .venv/bin/python scripts/diagnose_generator.py --config configs/tiny.yaml --image-guidance 1 3 5 10 --variants 1
    .venv/bin/python scripts/diagnose_generator.py --config configs/tiny.yaml \
        --selector outputs/tiny/classifier/real-standard-resnet10t-seed0     # choose settings by labelled data only

Needs the fine-tuned model (train_mvc.py). Writes <run.output_dir>/diagnose/{diagnose.md, diagnose.json,
diagnose.png, tb/, sets/}.
"""

from __future__ import annotations

from mvc.core.config import build_parser, parse_args
from mvc.core.utils import MVCError, run_cli


def cli(argv: list[str] | None = None) -> list[dict]:
    """Parse the config and the grid, run the diagnosis, print the table."""
    parser = build_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--variants", type=int, default=2, help="synthetic images per labelled source and row")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.5, 7.5], help="text guidance scales")
    parser.add_argument("--image-guidance", type=float, nargs="+", default=[1.0, 3.0, 5.0],
                        help="image guidance scales")
    parser.add_argument("--no-base", action="store_true", help="skip the base's text-to-image row")
    parser.add_argument("--selector", default=None, help="classifier checkpoint or run folder trained on the "
                        "labelled subset alone: its agreement is the column to choose settings by")
    parser.add_argument("--out", default=None, help="output folder, inside run.output_dir unless absolute "
                        "(default: <run.output_dir>/diagnose)")
    cfg, args = parse_args(parser, argv)
    if args.variants < 1:
        raise MVCError("--variants must be >= 1")
    if min(args.guidance + args.image_guidance) <= 0:
        raise MVCError("--guidance and --image-guidance take positive scales")

    from mvc.core.paths import RunPaths, output_path
    from mvc.core.stage import start_stage
    from mvc.studies.diagnose import diagnose

    out = output_path(RunPaths.of(cfg).root, args.out, "diagnose", "--out")  # refused before any work
    stage = start_stage(cfg, "diagnose")
    rows = diagnose(cfg, stage.accelerator, out, args.variants, args.guidance, args.image_guidance,
                    base_rows=not args.no_base, selector=args.selector, progress=stage.is_main)
    if stage.is_main:
        print((out / "diagnose.md").read_text())
    return rows


if __name__ == "__main__":
    run_cli(cli)
