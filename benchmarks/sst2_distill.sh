#!/usr/bin/env bash
# Issue 16, measurement 1: SST-2 teacher (mpnet-base) -> minilm-l6 student, with and without distillation.
# Usage: SFTLAB_DATA_DIR=../shared/data bash benchmarks/sst2_distill.sh [OUT]   (default runs/kd-sst2)
# TEACHER_ROWS (30000) bounds the teacher's training rows: about 40 minutes on a 2-core CPU at ~20 examples/s.
# Each step is skipped when its run already finished (summary.json), so the script resumes where it stopped.
# The table (dev accuracy, parameters, CPU examples/s at batch 1 and 32) is benchmarks/kd_table.py's.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/kd-sst2}
SFTLAB=${SFTLAB:-.venv/bin/sftlab}
: "${SFTLAB_DATA_DIR:?set SFTLAB_DATA_DIR to the folder holding glue/}"
export SFTLAB_DATA_DIR
CFG=configs/glue/sst2.yaml
step() {  # step NAME overrides...: train unless done; resume an interrupted run
  local dir=$OUT/$1; shift
  if [ -f "$dir/summary.json" ]; then echo "$dir: done" >&2; return; fi
  if [ -f "$dir/config.yaml" ]; then "$SFTLAB" train $CFG "$@" output_dir="$dir" --resume "$dir" >/dev/null
  else "$SFTLAB" train $CFG "$@" output_dir="$dir" >/dev/null; fi
}
step teacher model.name=mpnet-base data.limit_train="${TEACHER_ROWS:-30000}" train.epochs=1 train.lr=3e-5 \
  train.eval_every=300
step student-nokd train.epochs=1
step student-kd train.epochs=1 objective.name=distill objective.teacher="$OUT/teacher" \
  objective.temperature="${KD_T:-2.0}" objective.alpha="${KD_ALPHA:-0.5}"
.venv/bin/python benchmarks/kd_table.py --data glue/sst2/dev.tsv \
  teacher="$OUT/teacher" no_kd="$OUT/student-nokd" distilled="$OUT/student-kd"
