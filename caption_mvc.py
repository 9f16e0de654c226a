"""Caption the labelled subset into the shared caption cache (<run.output_dir>/captions/).

    python caption_mvc.py --config configs/cifar10.yaml
    python caption_mvc.py --config configs/cifar10.yaml --captions.captioner=lavis   # in the LAVIS environment

train_mvc.py and generate_mvc.py caption what is missing themselves; this stage does it on its own,
for example in another environment, so that the main stack later reads the cache.
"""

from __future__ import annotations

from mvc.config import Config, build_parser, parse_args
from mvc.utils import run_cli


def main(cfg: Config) -> dict[str, str]:
    """Start the stage and caption every labelled image that the cache lacks."""
    from mvc.captions import load_captions
    from mvc.data import load_splits
    from mvc.stage import start_stage

    stage = start_stage(cfg, "caption_mvc")
    labelled, _, _ = load_splits(cfg.data)
    caps = load_captions(cfg, labelled, progress=stage.is_main)
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
