#!/usr/bin/env bash
# Issue 16, measurement 1: SST-2 teacher (mpnet-base) -> minilm-l6 student, with and without distillation.
# Usage: SFTLAB_DATA_DIR=../shared/data bash benchmarks/sst2_distill.sh [OUT]   (default runs/kd-sst2)
# TEACHER_ROWS (30000) bounds the teacher's training rows: about 40 minutes on a 2-core CPU at ~20 examples/s.
# Each step is skipped when its run already finished (summary.json), so the script resumes where it stopped.
# The table (dev accuracy, parameters, CPU examples/s at batch 1 and 32) is benchmarks/kd_table.py's.
OUT=${1:-runs/kd-sst2}
source "$(dirname "$0")/_steps.sh"
CFG=configs/glue/sst2.yaml
step teacher $CFG model.name=mpnet-base data.limit_train="${TEACHER_ROWS:-30000}" train.epochs=1 train.lr=3e-5 \
  train.eval_every=300
step student-nokd $CFG train.epochs=1
step student-kd $CFG train.epochs=1 objective.name=distill objective.teacher="$OUT/teacher" \
  objective.temperature="${KD_T:-2.0}" objective.alpha="${KD_ALPHA:-0.5}"
.venv/bin/python benchmarks/kd_table.py --data glue/sst2/dev.tsv \
  teacher="$OUT/teacher" no_kd="$OUT/student-nokd" distilled="$OUT/student-kd"
