#!/usr/bin/env bash
# Issue 16, measurement 2: a 3-layer student kept from minilm-l6's blocks [1, 3, 5], distilled (logits + attention
# + hidden states) from the fine-tuned 6-layer minilm-l6, against the same student without distillation.
# Usage: SFTLAB_DATA_DIR=../shared/data bash benchmarks/sst2_distill_layers.sh [OUT]   (default runs/kd-sst2)
# The teacher is OUT/student-nokd (benchmarks/sst2_distill.sh trains it); finished steps are skipped.
OUT=${1:-runs/kd-sst2}
source "$(dirname "$0")/_steps.sh"
CFG=configs/glue/sst2.yaml
[ -f "$OUT/student-nokd/summary.json" ] || { echo "train $OUT/student-nokd first (sst2_distill.sh)" >&2; exit 2; }
step student3-nokd $CFG model.keep_layers=[1,3,5] train.epochs=1
step student3-kd $CFG model.keep_layers=[1,3,5] train.epochs=1 objective.name=distill objective.teacher="$OUT/student-nokd" \
  objective.temperature="${KD_T:-2.0}" objective.alpha="${KD_ALPHA:-0.5}" \
  objective.attention_weight="${KD_ATT:-1.0}" objective.hidden_weight="${KD_HID:-1.0}"
.venv/bin/python benchmarks/kd_table.py --data glue/sst2/dev.tsv \
  teacher6="$OUT/student-nokd" no_kd3="$OUT/student3-nokd" distilled3="$OUT/student3-kd"
