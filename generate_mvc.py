"""Generate the synthetic set with Mixing Visual Concepts from the fine-tuned InstructPix2Pix model (or a baseline).

    python generate_mvc.py --config configs/tiny.yaml [--generate.multiplier=4 --mixing.coarse_k=4 ...]
    python generate_mvc.py --config configs/tiny.yaml --generate.method=img2img --generate.strength=0.2
    accelerate launch --num_processes 2 generate_mvc.py --config configs/tiny.yaml   # sharded

generate.method picks the generator (the registry in mvc/generation/generators.py; --help lists them). Writes
<run.output_dir>/synthetic[_<method>]/ (an ImageFolder + metadata.jsonl, docs/synthetic_format.md) and sample
grids; rerunning resumes. With curation.filters, cross-fitted classifiers of the labelled subset are trained
first and judge the candidates. docs/generators.md has more examples and the whole story.
"""

from __future__ import annotations

from mvc.core.config import Config, build_parser, parse_args
from mvc.core.utils import run_cli


def main(cfg: Config) -> dict:
    """Start the stage and generate this process's share of the synthetic set."""
    from mvc.core.paths import RunPaths
    from mvc.core.stage import start_stage
    from mvc.data.synthetic import set_name
    from mvc.generation.curation import train_selectors
    from mvc.generation.generate import run_generation

    # one config file per set (config-generate_synthetic.yaml, config-generate_synthetic_img2img_clusters.yaml, ...)
    stage = start_stage(cfg, f"generate_{set_name(RunPaths.of(cfg).synthetic)}", dtype_from="generate")
    if cfg.curation.filters:  # the cross-fitted selectors that judge the candidates: trained once, resumable
        train_selectors(cfg, stage.accelerator)
    summary = run_generation(cfg, stage.accelerator, stage.paths)
    if stage.is_main:
        print(f"synthetic set ({summary['method']}): {summary.get('images')} images ({summary.get('rejected')} rejected by the filter) "
              f"at {summary['resolution']} px, {summary['made']} made now at {summary['images_per_s']} img/s on rank 0")
    return summary


def cli(argv: list[str] | None = None) -> dict:
    """Parse the config, then run the stage."""
    cfg, _ = parse_args(build_parser(__doc__.strip().splitlines()[0]), argv)
    return main(cfg)


def console() -> None:
    """Entry point of the `mvc-generate` command."""
    run_cli(cli)


if __name__ == "__main__":
    console()
