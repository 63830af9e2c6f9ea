"""Training verbs run under jemalloc when the system has it (`SFTLAB_ALLOCATOR=auto`, the default).

Why: glibc's malloc keeps and fragments the memory of freed activations. One 8 x 512 smollm2 LoRA forward with
activation checkpointing saved 771 MB of tensors for backward while the process grew 5.2 GB; a fixed 4 MB mmap
threshold fixed the growth but its page faults cost 20% of the speed. jemalloc reuses freed blocks instead:
  LoRA on smollm2 (benchmarks/trl_sft.py work): 124 -> 142 tokens/s, peak RSS 6035 -> 3418 MB;
  minilm-l6 on SST-2 4,000 x 1: 203 -> 217 examples/s, peak RSS 1099 -> 1171 MB.
Decay: first it was off (freed pages never handed back). That grew without bound on packed causal-LM LoRA
(configs/instruct/sst2_lora.yaml, 256-token packs): ~0.5 GB a step, OOM-killed at 24 GB after 61 steps. Dirty pages
purged after 5 s (muzzy off) keep the reuse within a step and bound the process, measured 2026-12-01 on 300 rows
(11 steps): decay off 381 tokens/s, peak 7183 MB and climbing; 5 s decay 374 tokens/s, 4535 MB, flat (1.3-2.7 GB
between steps); jemalloc's default 10 s decay with a background thread 323 tokens/s; minilm-l6 SST-2 4,000 x 1
(two runs each, alternated): 400, 374 -> 377, 365 examples/s, peak 1109 -> 1018 MB.
The allocator is chosen when a process starts, so the CLI re-executes itself once with LD_PRELOAD, as Intel's
PyTorch launcher (`ipexrun`) does. Only from the console entry (never from `sftlab.cli.main()` in-process) and only
for train / compare / tune. SFTLAB_ALLOCATOR=system keeps glibc; a MALLOC_CONF the user set is left as it is.
"""
from __future__ import annotations

import ctypes.util
import os
import sys

VERBS = {"train", "compare", "tune"}
CONF = "dirty_decay_ms:5000,muzzy_decay_ms:0"
_MARK = "_SFTLAB_ALLOCATOR_SET"


def current() -> str:
    """The allocator this process runs under: jemalloc or system."""
    return "jemalloc" if "jemalloc" in os.environ.get("LD_PRELOAD", "") else "system"


def reexec_under_jemalloc(argv: list[str]) -> None:
    """Replace this process with `python -m sftlab ARGV` under jemalloc, or return (nothing to do, or not possible)."""
    choice = os.environ.get("SFTLAB_ALLOCATOR", "auto")
    if choice == "system" or os.environ.get(_MARK) or current() == "jemalloc" or not argv or argv[0] not in VERBS:
        return
    lib = ctypes.util.find_library("jemalloc")
    if lib is None:
        if choice == "jemalloc":
            print("sftlab: warning: SFTLAB_ALLOCATOR=jemalloc but no libjemalloc found (Debian: apt-get install "
                  "libjemalloc2); using the system allocator", file=sys.stderr)
        return
    env = dict(os.environ, LD_PRELOAD=" ".join(filter(None, [lib, os.environ.get("LD_PRELOAD")])), **{_MARK: "1"})
    env.setdefault("MALLOC_CONF", CONF)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, "-m", "sftlab", *argv], env)
    except OSError:
        return  # keep going under the system allocator
