#!/usr/bin/env bash
# Set up (first time only) and run the quickstart: fine-tune the packaged minilm-l6 encoder on the bundled
# demo sentiment data (240 train / 80 dev), then print the dev metrics of the best checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
run_dir=$(.venv/bin/sftlab train configs/quickstart.yaml "$@" | tail -n 1)
echo "run directory: $run_dir"
echo "dev metrics:"
.venv/bin/sftlab eval "$run_dir" --data src/sftlab/demo/dev.jsonl | tail -n 1
