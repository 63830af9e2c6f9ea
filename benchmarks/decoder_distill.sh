#!/usr/bin/env bash
# Issue 16, measurement 3: the half-depth student of smollm2-135m-instruct distilled (token-level top-k KD) from a
# LoRA-tuned smollm2-135m-instruct teacher on SST-2 as chat, against the same student trained without KD.
# Usage: SFTLAB_DATA_DIR=../shared/data bash benchmarks/decoder_distill.sh [OUT]   (default runs/kd-decoder)
# `sftlab eval --baselines` on the distilled run scores it, the teacher, the no-KD twin (trained there once), the
# base model zero-shot and 4-shot on the full dev set: label accuracy, parameters and generated tokens/s per row.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/kd-decoder}
SFTLAB=${SFTLAB:-.venv/bin/sftlab}
: "${SFTLAB_DATA_DIR:?set SFTLAB_DATA_DIR to the folder holding glue/}"
export SFTLAB_DATA_DIR
step() {  # step NAME CONFIG overrides...
  local dir=$OUT/$1 cfg=$2; shift 2
  if [ -f "$dir/summary.json" ]; then echo "$dir: done" >&2; return; fi
  if [ -f "$dir/config.yaml" ]; then "$SFTLAB" train "$cfg" "$@" output_dir="$dir" --resume "$dir" >/dev/null
  else "$SFTLAB" train "$cfg" "$@" output_dir="$dir" >/dev/null; fi
}
step teacher configs/instruct/sst2_lora.yaml
step student-kd configs/instruct/sst2_student.yaml objective.name=distill objective.teacher="$OUT/teacher" \
  objective.temperature="${KD_T:-2.0}" objective.alpha="${KD_ALPHA:-0.5}"
"$SFTLAB" eval "$OUT/student-kd" --data glue/sst2/dev.tsv --labels positive,negative --baselines
