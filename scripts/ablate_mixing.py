"""The mixing-granularity ablation (the paper's Figure 5, measured): coarse k per stage and mode, the window,
fine s and m, over several seeds, judged by the evaluation-only reference classifier.

    .venv/bin/python scripts/ablate_mixing.py --config configs/tiny.yaml
    .venv/bin/python scripts/ablate_mixing.py --config configs/tiny.yaml --k 1 2 4 8 --s 1 2 4 8 16 --seeds 0 1 2
    .venv/bin/python scripts/ablate_mixing.py --config configs/tiny.yaml --downstream "fine s=4 m=3" "none"

Needs the fine-tuned model (train_mvc.py). Writes <run.output_dir>/ablation_mixing/{ablation.md, ablation.json,
ablation.png, tb/, sets/} and, with --downstream, downstream.{md,json}: full-size sets of the chosen
settings and the accuracy of classifiers trained with them (--downstream-strategy, pipeline.seeds).
"""

from __future__ import annotations

from mvc.core.config import build_parser, parse_args
from mvc.core.utils import MVCError, run_cli


def cli(argv: list[str] | None = None) -> list[dict]:
    """Parse the config and the sweep, run it, print the table."""
    parser = build_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8], help="coarse k values")
    parser.add_argument("--s", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="fine slice sizes s (m fixed)")
    parser.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 8], help="fine token counts m (s fixed)")
    parser.add_argument("--stages", nargs="+", default=["tokens", "embeds"], choices=["tokens", "embeds"])
    parser.add_argument("--modes", nargs="+", default=["shuffle", "swap"], choices=["shuffle", "swap"])
    parser.add_argument("--windows", nargs="+", default=["caption", "prompt", "all"],
                        help="coarse windows: caption, prompt, all, or START:END")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sources", type=int, default=4, help="sources per class")
    parser.add_argument("--variants", type=int, default=2, help="variants per source")
    parser.add_argument("--downstream", nargs="+", default=None, metavar="SETTING",
                        help="settings (by name, as in the table) to train classifiers with")
    parser.add_argument("--downstream-strategy", default="probabilistic")
    parser.add_argument("--out", default=None, help="output folder, inside run.output_dir unless absolute "
                                                     "(default: <run.output_dir>/ablation_mixing)")
    cfg, args = parse_args(parser, argv)
    for name in ("k", "s", "m", "seeds"):
        if not getattr(args, name):
            raise MVCError(f"--{name} needs at least one value")
    if min(args.k + args.s + args.m + [args.sources, args.variants]) < 1:
        raise MVCError("--k, --s, --m, --sources and --variants must be >= 1")
    if args.sources < 2:
        raise MVCError("--sources must be >= 2 (donors come from the other sources of a class)")
    windows = [w if w in ("caption", "prompt", "all") else _span(w) for w in args.windows]

    from mvc.core.paths import RunPaths, output_path
    from mvc.core.stage import start_stage
    from mvc.studies.ablation import downstream, run_ablation, sweep

    out = output_path(RunPaths.of(cfg).root, args.out, "ablation_mixing", "--out")  # refused before any work
    stage = start_stage(cfg, "ablate_mixing")
    settings = sweep(args.k, args.s, args.m, args.stages, args.modes, windows, cfg.mixing.coarse_k,
                     cfg.mixing.fine_s, cfg.mixing.fine_m)
    rows = run_ablation(cfg, stage.accelerator, settings, args.seeds, args.sources, args.variants, out,
                        progress=stage.is_main)
    if stage.is_main:
        print((out / "ablation.md").read_text())
    if args.downstream:
        by_name = {s.name: s for s in settings}
        unknown = [n for n in args.downstream if n not in by_name]
        if unknown:
            raise MVCError(f"--downstream: unknown setting(s) {', '.join(map(repr, unknown))}; "
                           f"names are in the table, e.g. {settings[1].name!r}")
        downstream(cfg, stage.accelerator, [by_name[n] for n in args.downstream], args.downstream_strategy, out)
        if stage.is_main:
            print((out / "downstream.md").read_text())
    return rows


def _span(text: str) -> list[int]:
    """'1:12' -> [1, 12]."""
    try:
        a, b = (int(v) for v in text.split(":"))
    except ValueError:
        raise MVCError(f"--windows: {text!r} is not caption, prompt, all or START:END") from None
    return [a, b]


if __name__ == "__main__":
    run_cli(cli)
