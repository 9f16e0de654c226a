"""Caption the labelled subset into the shared caption cache (<run.output_dir>/captions/).

    python caption_mvc.py --config configs/cifar10.yaml
    accelerate launch caption_mvc.py --config configs/cifar10.yaml   # one shard per GPU, BLIP-2 in fp16
    python caption_mvc.py --config configs/cifar10.yaml --captions.captioner=lavis   # in the LAVIS environment

train_mvc.py and generate_mvc.py caption what is missing themselves; this stage does it on its own,
for example in another environment, so that the main stack later reads the cache (docs/lavis.md).
Interrupted runs resume: captions are written a batch at a time.
"""

from __future__ import annotations

from mvc.core.config import Config, build_parser, parse_args
from mvc.core.utils import run_cli


def main(cfg: Config) -> dict[str, str]:
    """Start the stage and caption every labelled image that the cache lacks; writes captions/summary.json."""
    import time

    from mvc.core.perf import peak_memory_gb
    from mvc.core.stage import start_stage
    from mvc.core.utils import atomic_write_json
    from mvc.data import load_splits
    from mvc.data.captions import build_captioner, load_captions

    stage = start_stage(cfg, "caption_mvc")
    labelled, _, _ = load_splits(cfg.data)
    acc = stage.accelerator  # every process captions its share (BLIP-2 in fp16 on CUDA)
    t0 = time.perf_counter()
    caps = load_captions(cfg, labelled, acc.is_main_process, acc.device, acc.process_index, acc.num_processes,
                         acc.wait_for_everyone)
    if stage.is_main:
        # what the captioner ran as (building it loads no model)
        info = build_captioner(cfg.captions, acc.device).describe()
        atomic_write_json(stage.paths.captions / "summary.json", {
            **info, "model": cfg.captions.model_id if cfg.captions.captioner == "blip2" else None,
            "images": len(caps), "processes": acc.num_processes, "seconds": round(time.perf_counter() - t0, 2),
            "peak_memory_gb": peak_memory_gb(acc.device)})  # of the main process (None off CUDA)
        print(f"{len(caps)} captions in {stage.paths.captions} ({info['captioner']} on {info['device']}, "
              f"{info['dtype']})")
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
