"""Fine-tune the base pipeline the InstructPix2Pix way on the labelled subset's index pairs (MVC).

    python train_mvc.py --config configs/tiny.yaml [--resume latest] [--train.max_steps=500]
    accelerate launch train_mvc.py ...   |   torchrun --nproc_per_node 2 train_mvc.py ...

Writes <run.output_dir>/pairs.npz, captions/, mvc/{checkpoints,tb,log.jsonl,validation}/ and
mvc/final/ (a StableDiffusionInstructPix2PixPipeline folder).
"""

from __future__ import annotations

from mvc.core.config import Config, build_parser, parse_args
from mvc.core.utils import run_cli


def main(cfg: Config, resume: str | None = None) -> dict:
    """Start the stage and fine-tune (`run_pipeline.py` calls this with its resolved config)."""
    from mvc.core.checkpoint import check_resume
    from mvc.core.paths import RunPaths
    from mvc.core.stage import start_stage
    from mvc.diffusion.finetune_loop import run

    check_resume(resume, RunPaths.of(cfg).checkpoints, fresh_ok=False)  # before the slow loading below
    stage = start_stage(cfg, "train_mvc", precision_from="train")
    return run(cfg, stage.accelerator, resume=resume)


def cli(argv: list[str] | None = None) -> dict:
    """Parse the config and flags, then run the stage."""
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--resume", default=None, metavar="{latest,PATH}",
                        help="Continue from the newest checkpoint ('latest') or a checkpoint file.")
    cfg, args = parse_args(parser, argv)
    return main(cfg, resume=args.resume)


def console() -> None:
    """Entry point of the `mvc-train` command."""
    run_cli(cli)


if __name__ == "__main__":
    console()
