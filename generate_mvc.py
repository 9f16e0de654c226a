"""Generate the synthetic set with Mixing Visual Concepts from the fine-tuned InstructPix2Pix model.

    python generate_mvc.py --config configs/tiny.yaml [--generate.multiplier=4 --mixing.coarse_k=4 ...]
    python generate_mvc.py --config configs/tiny.yaml --mixing.coarse_stage=embeds   # paper-literal coarse op
    accelerate launch --num_processes 2 generate_mvc.py --config configs/tiny.yaml   # sharded

Writes <run.output_dir>/synthetic/<class>/<source>_v<variant>.png + metadata.jsonl (ImageFolder),
and sample grids + TensorBoard to <run.output_dir>/synthetic_grids/. Rerunning resumes: only
missing images are made. Coarse mixing edits the prompt's token ids before the text encoder by
default (mixing.coarse_stage=tokens); see docs/architecture.md, "Coarse mixing".
"""

from __future__ import annotations

from pathlib import Path

from mvc.config import build_parser, parse_args, save_config
from mvc.utils import run_cli


def main(argv: list[str] | None = None) -> dict:
    """Parse the config, then generate this process's share of the synthetic set."""
    cfg, _ = parse_args(build_parser(__doc__.strip().splitlines()[0]), argv)
    from accelerate import Accelerator

    from mvc.generate import generate_synthetic

    acc = Accelerator()
    if acc.is_main_process:
        save_config(cfg, Path(cfg.run.output_dir) / "config-generate_mvc.yaml")
    summary = generate_synthetic(cfg, rank=acc.process_index, world=acc.num_processes, barrier=acc.wait_for_everyone,
                                 device=acc.device, progress=acc.is_local_main_process)
    if acc.is_main_process:
        print(f"synthetic set: {summary.get('images')} images ({summary.get('rejected')} rejected by the filter), "
              f"{summary['made']} made now at {summary['images_per_s']} img/s on rank 0")
    return summary


if __name__ == "__main__":
    run_cli(main)
