#!/usr/bin/env bash
# Every strategy on SST-2 with minilm-l6 (issue 4's table). Extra arguments pass through to `sftlab compare`,
# e.g. --out runs/my-compare, --resume, data.limit_train=4000, --strategies full,lora.
# Learning rates: full fine-tuning's 1e-4 (configs/glue/sst2.yaml); methods that train few parameters take
# larger steps, as their papers do (LoRA 1e-3, adapters 1e-3, BitFit 1e-3, prompt tuning 3e-2).
set -euo pipefail
cd "$(dirname "$0")/../.."
export SFTLAB_DATA_DIR="${SFTLAB_DATA_DIR:-$(cd .. && pwd)/shared/data}"
SFTLAB="${SFTLAB:-.venv/bin/sftlab}"
exec "$SFTLAB" compare configs/compare/sst2_strategies.yaml \
  --strategies "${STRATEGIES:-full,llrd,ffn_only,top_k_layers,gradual_unfreezing,head_only,bitfit,lora,dora,adapter,prefix_tuning,prompt_tuning}" \
  --set llrd:train.lr=2e-4 \
  --set ffn_only:train.lr=2e-4 \
  --set top_k_layers:train.lr=2e-4 --set top_k_layers:strategy.k=2 \
  --set gradual_unfreezing:train.lr=2e-4 --set gradual_unfreezing:strategy.unfreeze_every=50 \
  --set head_only:train.lr=1e-2 \
  --set bitfit:train.lr=1e-3 \
  --set lora:train.lr=1e-3 \
  --set dora:train.lr=1e-3 \
  --set adapter:train.lr=1e-3 \
  --set prefix_tuning:train.lr=1e-2 \
  --set prompt_tuning:train.lr=3e-2 \
  "$@"
