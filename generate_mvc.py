"""Generate the synthetic set with Mixing Visual Concepts from the fine-tuned InstructPix2Pix model (or a baseline).

    python generate_mvc.py --config configs/tiny.yaml [--generate.multiplier=4 --mixing.coarse_k=4 ...]
    python generate_mvc.py --config configs/tiny.yaml --mixing.coarse_stage=embeds   # paper-literal coarse op
    python generate_mvc.py --config configs/tiny.yaml --generate.method=img2img --generate.strength=0.2
    python generate_mvc.py --config configs/tiny.yaml --generate.method=textual_inversion   # DA-Fusion
    python generate_mvc.py --config configs/tiny.yaml --generate.method=dreambooth   # trains DreamBooth first
    accelerate launch --num_processes 2 generate_mvc.py --config configs/tiny.yaml   # sharded

generate.method picks the generator (mvc/generation/generators.py): mvc (default), mvc_nomix (mixing off), txt2img
(the base, not fine-tuned, from the class prompt; generate.caption=true adds the image's caption),
img2img (SDEdit from each real image at generate.strength), textual_inversion (a token embedding learned
per class first, under <run.output_dir>/textual_inversion/, then img2img with it in the prompt) or
dreambooth (the base fine-tuned with one rare identifier per class and prior preservation, the
dreambooth.* keys: trained on first use into <run.output_dir>/dreambooth/final, resumed from its
checkpoints when interrupted, reused afterwards); only mvc and mvc_nomix need train_mvc.py first, and
every method writes the same format, to <run.output_dir>/synthetic_<method>/ unless generate.out_dir
says otherwise. With curation.filters (e.g. --curation.filters='[wrong, easy]'), classifiers of the labelled
subset are trained first (cross-fitted, under <run.output_dir>/curation/) and the set goes to
..._curated_<filters>/: candidates are judged as they are made, and made until every class keeps its planned count.

Writes <run.output_dir>/synthetic/<NNN>_<class>/<source>_v<variant>.png + metadata.jsonl (an ImageFolder
whose class indices are the dataset's), and sample grids + TensorBoard to <run.output_dir>/synthetic_grids/.
Rerunning resumes: only missing images are made. Images are sampled at the resolution the model was
fine-tuned at (generate.resolution overrides it). Coarse mixing edits the prompt's token ids before the
text encoder by default (mixing.coarse_stage=tokens); see docs/architecture.md, "Coarse mixing".
"""

from __future__ import annotations

from mvc.core.config import Config, build_parser, parse_args
from mvc.core.utils import run_cli


def main(cfg: Config) -> dict:
    """Start the stage and generate this process's share of the synthetic set."""
    from mvc.core.paths import RunPaths
    from mvc.core.stage import start_stage
    from mvc.data.synthetic import set_name
    from mvc.generation.generate import generate_synthetic

    # one config file per set (config-generate_synthetic.yaml, config-generate_synthetic_img2img_clusters.yaml, ...)
    stage = start_stage(cfg, f"generate_{set_name(RunPaths.of(cfg).synthetic)}", dtype_from="generate")
    acc = stage.accelerator
    if cfg.curation.filters:  # the cross-fitted selectors of the labelled subset, trained once (resumable)
        from mvc.generation.curation import train_selectors

        train_selectors(cfg, acc)
    summary = generate_synthetic(cfg, rank=acc.process_index, world=acc.num_processes, barrier=acc.wait_for_everyone,
                                 device=acc.device, progress=acc.is_local_main_process)
    if acc.is_main_process:
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
