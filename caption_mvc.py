"""Caption the labelled subset into the shared caption cache (<run.output_dir>/captions/).

    python caption_mvc.py --config configs/cifar10.yaml
    accelerate launch caption_mvc.py --config configs/cifar10.yaml   # one shard per GPU, BLIP-2 in fp16
    python caption_mvc.py --config configs/cifar10.yaml --captions.captioner=lavis   # in the LAVIS environment

train_mvc.py and generate_mvc.py caption what is missing themselves; this stage does it on its own,
for example in another environment, so that the main stack later reads the cache (docs/lavis.md).
Interrupted runs resume: captions are written a batch at a time.
"""

from __future__ import annotations

from mvc.config import Config, build_parser, parse_args
from mvc.utils import run_cli


def main(cfg: Config) -> dict[str, str]:
    """Start the stage and caption every labelled image that the cache lacks."""
    from mvc.captions import load_captions
    from mvc.data import load_splits
    from mvc.prompts import validate_template
    from mvc.stage import start_stage

    validate_template(cfg.captions.prompt_template)
    stage = start_stage(cfg, "caption_mvc")
    labelled, _, _ = load_splits(cfg.data)
    acc = stage.accelerator  # every process captions its share (BLIP-2 in fp16 on CUDA)
    caps = load_captions(cfg, labelled, acc.is_main_process, acc.device, acc.process_index, acc.num_processes,
                         acc.wait_for_everyone)
    if stage.is_main:
        print(f"{len(caps)} captions in {stage.paths.captions}")
    return caps


def cli(argv: list[str] | None = None) -> dict[str, str]:
    """Parse the config, then run the stage."""
    cfg, _ = parse_args(build_parser(__doc__.splitlines()[0]), argv)
    return main(cfg)


def console() -> None:
    """Entry point of the `mvc-caption` command."""
    run_cli(cli)


if __name__ == "__main__":
    console()
