#!/usr/bin/env bash
# A miniature full-profile run on CPU: the real configs/<dataset>.yaml, overridden for scale only.
#   usage: tests/smoke/run.sh {cifar10,cifar100,caltech101,brain_tumor,tiny_imagenet} [WORKDIR]
# It writes fixture data in the dataset's on-disk layout, an SD-1.5-structured base and a BLIP-2 from
# a small config (local folders in place of the hub ids), then runs scripts/_reproduce.sh -- BLIP-2
# captioning, fine-tuning and generation under `accelerate launch`, then the evaluation, the
# classifier runs of the config and the report -- and prints one JSON summary (captioner, device and
# dtype, fine-tuning resolution, generated image size, optimizer steps per run, precision in effect).
# It fails when the generated images do not have the fine-tuning resolution or the runs' budgets differ.
# Environment: PYTHON; MVC_LAUNCH_ARGS (e.g. "--multi_gpu --num_processes 2": two CPU processes for
# captioning, fine-tuning and generation); MVC_SMOKE_PRECISION (the accelerate config's mixed
# precision: no (default) or bf16).
set -euo pipefail
cd "$(dirname "$0")/../.."
usage="usage: tests/smoke/run.sh {cifar10,cifar100,caltech101,brain_tumor,tiny_imagenet} [WORKDIR]"
[ $# -ge 1 ] || { echo "$usage" >&2; exit 2; }
dataset="$1"
work="${2:-$(mktemp -d -t mvc-smoke-XXXXXX)}"
mkdir -p "$work"
work="$(cd "$work" && pwd)"
PY=${PYTHON:-python}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
# the model hub is offline and private to this run: the stand-ins replace it (HF_HOME also holds the
# accelerate config this run writes, so a user's own `accelerate config` is not read)
export HF_HOME="$work/hf" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
t0=$SECONDS
mapfile -t over < <("$PY" -m tests.smoke.harness prepare "$dataset" "$work")
[ "${#over[@]}" -gt 0 ] || { echo "smoke_full: prepare failed" >&2; exit 1; }
printf '%s\n' "${over[@]}" > "$work/overrides.txt"  # what `smoke_full.py summary` is given
PYTHON="$PY" scripts/_reproduce.sh "configs/$dataset.yaml" "${over[@]}" > "$work/run.log" 2>&1 \
  || { tail -n 40 "$work/run.log" >&2; echo "smoke_full: the run failed (log: $work/run.log)" >&2; exit 1; }
echo "smoke_full: $dataset took $((SECONDS - t0)) s (log: $work/run.log)" >&2
"$PY" -m tests.smoke.harness summary "$dataset" "$work" "${over[@]}"
