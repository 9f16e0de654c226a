#!/usr/bin/env bash
# Shared body of scripts/reproduce_<dataset>.sh: the full profile end to end on a GPU machine.
#   usage: scripts/_reproduce.sh CONFIG [--section.key=value ...]
# Captioning, fine-tuning and generation run under `accelerate launch` (every local GPU, with the
# precision of `accelerate config`: configure it once); the evaluation, the classifiers of every
# recipe and the report then run through run_pipeline.py in one process (still launched by
# accelerate, so that its precision applies), which skips the stages that are done. Every stage
# resumes when the script is run again.
# Environment: PYTHON (default .venv/bin/python, else python); MVC_LAUNCH_ARGS, extra flags for
# `accelerate launch` of captioning, fine-tuning and generation (e.g. "--multi_gpu --num_processes 2
# --mixed_precision bf16"; the pipeline, one process, takes only --mixed_precision from them).
set -euo pipefail
cd "$(dirname "$0")/.."
config="$1"; shift
PY=${PYTHON:-python}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
read -r -a extra <<< "${MVC_LAUNCH_ARGS:-}"
LAUNCH=("$PY" -m accelerate.commands.launch "${extra[@]}")
# run.output_dir as the stages resolve it: the config file with the overrides given here (a bad
# override fails here, in one line, before any stage starts)
out=$("$PY" -c "import sys; from mvc.core.config import build_parser, parse_args
from mvc.core.utils import run_cli
run_cli(lambda argv: print(parse_args(build_parser('_reproduce.sh'), argv)[0].run.output_dir), sys.argv[1:])" \
  --config "$config" "$@")
resume=()
ls "$out"/mvc/checkpoints/checkpoint-*.pt >/dev/null 2>&1 && resume=(--resume latest)
"${LAUNCH[@]}" caption_mvc.py --config "$config" "$@"
[ -f "$out/mvc/final/model_index.json" ] || "${LAUNCH[@]}" train_mvc.py --config "$config" "${resume[@]}" "$@"
"${LAUNCH[@]}" generate_mvc.py --config "$config" "$@"
one=()  # of MVC_LAUNCH_ARGS, what still applies to the one-process pipeline: the mixed precision
for ((i = 0; i < ${#extra[@]}; i++)); do
  case "${extra[i]}" in
    --mixed_precision=*) one+=("${extra[i]}") ;;
    --mixed_precision) one+=("${extra[i]}" "${extra[i + 1]:-}"); i=$((i + 1)) ;;
  esac
done
"$PY" -m accelerate.commands.launch "${one[@]}" --num_processes 1 run_pipeline.py --config "$config" "$@"
