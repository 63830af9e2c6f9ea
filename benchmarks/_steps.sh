# Sourced by the distillation measurement scripts: OUT, SFTLAB and the data folder, and `step NAME CONFIG
# overrides...`, which trains OUT/NAME unless it finished (summary.json) and resumes it if it was interrupted.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." >/dev/null
SFTLAB=${SFTLAB:-.venv/bin/sftlab}
: "${SFTLAB_DATA_DIR:?set SFTLAB_DATA_DIR to the folder holding glue/}"
export SFTLAB_DATA_DIR
step() {
  local dir=$OUT/$1 cfg=$2; shift 2
  if [ -f "$dir/summary.json" ]; then echo "$dir: done" >&2; return; fi
  if [ -f "$dir/config.yaml" ]; then "$SFTLAB" train "$cfg" "$@" output_dir="$dir" --resume "$dir" >/dev/null
  else "$SFTLAB" train "$cfg" "$@" output_dir="$dir" >/dev/null; fi
}
