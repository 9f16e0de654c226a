#!/usr/bin/env bash
# Shared body of scripts/reproduce_<dataset>.sh: the full profile end to end on a GPU machine.
#   usage: scripts/_reproduce.sh CONFIG [--section.key=value ...]
# Fine-tuning and generation run under `accelerate launch` (all local GPUs; configure once with
# `accelerate config`); the classifiers and the report then run through run_pipeline.py, which
# skips the stages that are already done. Every stage resumes if the script is run again.
set -euo pipefail
cd "$(dirname "$0")/.."
config="$1"; shift
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && PY=.venv/bin/python
LAUNCH=("$PY" -m accelerate.commands.launch)
resume=()
# the run folder as the stages will see it: the config file with the command line's overrides
out=$("$PY" -c "import sys; from mvc.config import build_parser, parse_args; print(parse_args(build_parser(''), sys.argv[1:])[0].run.output_dir)" --config "$config" "$@")
ls "$out"/mvc/checkpoints/checkpoint-*.pt >/dev/null 2>&1 && resume=(--resume latest)
[ -f "$out/mvc/final/model_index.json" ] || "${LAUNCH[@]}" train_mvc.py --config "$config" "${resume[@]}" "$@"
"${LAUNCH[@]}" generate_mvc.py --config "$config" "$@"
"$PY" run_pipeline.py --config "$config" "$@"
