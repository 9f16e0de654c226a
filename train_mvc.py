"""Fine-tune the base pipeline the InstructPix2Pix way on the labelled subset's index pairs (MVC).

    python train_mvc.py --config configs/tiny.yaml [--resume latest] [--train.max_steps=500]
    accelerate launch train_mvc.py ...   |   torchrun --nproc_per_node 2 train_mvc.py ...

Writes <run.output_dir>/pairs.npz, captions/, mvc/{checkpoints,tb,log.jsonl,validation}/ and
mvc/final/ (a StableDiffusionInstructPix2PixPipeline folder).
"""

from __future__ import annotations

from mvc.config import build_parser, parse_args
from mvc.utils import run_cli


def main(argv: list[str] | None = None) -> None:
    """Parse the config and flags, then run the stage."""
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--resume", default=None, metavar="{latest,PATH}",
                        help="Continue from the newest checkpoint ('latest') or a checkpoint file.")
    cfg, args = parse_args(parser, argv)
    from mvc.finetune_loop import main

    main(cfg, resume=args.resume)


if __name__ == "__main__":
    run_cli(main)
