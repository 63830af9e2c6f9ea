#!/usr/bin/env bash
# Set up (first time only) and run the whole test suite: unit tests (tiny in-process models, seconds) and
# integration tests (marker `integration`: the packaged minilm-l6 on small data; ../shared/data when present).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# tests/integration/test_report_browser.py opens a report in headless Chromium (Debian's package); under CI=true it
# fails rather than skips without one, so a failed install shows up there.
command -v chromium >/dev/null || { command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] && \
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null); } \
  || echo "note: chromium not installed; the report browser test will skip (or fail under CI=true)" >&2
# tests/unit/test_search_workers.py starts a throw-away PostgreSQL server (initdb/pg_ctl from Debian's package).
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] && \
  (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null 2>&1 || (apt-get update -qq && \
   DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null)); } \
  || echo "note: postgresql not installed; the distributed search test will skip (or fail under CI=true)" >&2
# A full disk turns every later test into a set-up error with no hint why (stop 34's CI): say so first. The suite
# needs ~1 GB under the temp folder (passed tests' folders are deleted as they end) and ~1 GB of model cache.
for d in . "${TMPDIR:-/tmp}"; do
  free_mb=$(df -Pm "$d" 2>/dev/null | awk 'NR==2 {print $4}')
  [ -n "$free_mb" ] && [ "$free_mb" -lt 3072 ] && \
    echo "note: only ${free_mb} MB free on the disk of $d; the suite needs ~2 GB (tests fail at set-up when it fills)" >&2
done
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"
