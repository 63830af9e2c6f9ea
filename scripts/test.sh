#!/usr/bin/env bash
# Set up (first time only) and run the whole test suite: unit tests (tiny in-process models, seconds) and
# integration tests (marker `integration`: the packaged minilm-l6 on small data; ../shared/data when present).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"
