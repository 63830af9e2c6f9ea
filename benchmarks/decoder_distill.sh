#!/usr/bin/env bash
# Issue 16, measurement 3: the half-depth student of smollm2-135m-instruct distilled (token-level top-k KD) from a
# LoRA-tuned smollm2-135m-instruct teacher on SST-2 as chat, against the same student trained without KD.
# Usage: SFTLAB_DATA_DIR=../shared/data bash benchmarks/decoder_distill.sh [OUT]   (default runs/kd-decoder)
# `sftlab eval --baselines` on the distilled run scores it, the teacher, the no-KD twin (trained there once), the
# base model zero-shot and 4-shot on the full dev set: label accuracy, parameters and generated tokens/s per row.
OUT=${1:-runs/kd-decoder}
source "$(dirname "$0")/_steps.sh"
step teacher configs/instruct/sst2_lora.yaml
step student-kd configs/instruct/sst2_student.yaml objective.name=distill objective.teacher="$OUT/teacher" \
  objective.temperature="${KD_T:-2.0}" objective.alpha="${KD_ALPHA:-0.5}"
"$SFTLAB" eval "$OUT/student-kd" --data glue/sst2/dev.tsv --labels positive,negative --baselines
