#!/usr/bin/env bash
# The full profile on one GPU, measured: configs/caltech101.yaml through scripts/_reproduce.sh (the script a user
# runs) with the miniature run's fixture data and stand-ins, but SD-1.5 at its full width (random weights), in
# mixed precision from an accelerate config for one GPU, sized to finish in a few minutes. It prints one JSON
# summary: images/s of captioning, fine-tuning and each generator, classifier steps/s, peak GPU memory per stage,
# the share of this GPU's bf16 matmul peak (measured first, in the same run) that each stage's FLOPs reach, and
# the miniature run's checks.
#   usage: scripts/gpu_check.sh [--cpu] [WORKDIR]
# --cpu: the same on the CPU at the miniature run's scale (what the tests run).
# Environment: PYTHON; RUN_S (cap on the run in seconds, default 300 on the GPU: the summary then reports the
# stages that finished); MVC_GPU_PRECISION (accelerate's mixed precision on the GPU: fp16 (default), bf16, no);
# STEPS (fine-tuning steps, 30), PER_CLASS (images per class and generator, 16), CLF_STEPS (classifier steps, 20).
# Exit status 0 when the run finished and its checks passed; the summary is printed either way.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # scripts/gpu_check.py imports the miniature run's harness (tests/smoke)
mode=gpu
if [ "${1:-}" = "--cpu" ]; then mode=cpu; shift; fi
work="${1:-$(mktemp -d -t mvc-gpu-check-XXXXXX)}"
mkdir -p "$work"
work="$(cd "$work" && pwd)"
PY=${PYTHON:-python}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
# the model hub is offline and private to this run (HF_HOME also holds the accelerate config written here)
export HF_HOME="$work/hf" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
t0=$SECONDS
mapfile -t over < <("$PY" scripts/gpu_check.py prepare "$work" "$mode")
[ "${#over[@]}" -gt 0 ] || { echo "gpu_check: prepare failed" >&2; exit 1; }
printf '%s\n' "${over[@]}" > "$work/overrides.txt"  # what `tests.smoke.harness summary` is given
echo "gpu_check: prepared in $((SECONDS - t0)) s ($mode)" >&2
"$PY" scripts/gpu_check.py peak "$work/peak.json" "$mode" || echo "gpu_check: the matmul peak failed" >&2
limit=${RUN_S:-300}
[ "$mode" = cpu ] && limit=${RUN_S:-3600}
t1=$SECONDS
PYTHON="$PY" timeout -k 20 "$limit" scripts/_reproduce.sh configs/caltech101.yaml "${over[@]}" > "$work/run.log" 2>&1
rc=$?
echo "gpu_check: the run took $((SECONDS - t1)) s, exit $rc$([ $rc = 124 ] && echo ' (RUN_S reached)') (log: $work/run.log)" >&2
[ $rc = 0 ] || tail -n 30 "$work/run.log" >&2
echo "{\"mode\": \"$mode\", \"exit\": $rc, \"run_seconds\": $((SECONDS - t1)), \"cap_seconds\": $limit}" > "$work/run.json"
"$PY" scripts/gpu_check.py summary "$work" "$work/peak.json" "${over[@]}"
summary_rc=$?
[ $rc = 0 ] && [ $summary_rc = 0 ]
