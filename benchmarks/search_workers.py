"""Issue 21's search measurement: `sftlab tune` with 1 worker vs W workers sharing one study on a throw-away
PostgreSQL server (Debian's `postgresql`; the same helper as the tests), optionally one worker SIGKILLed mid-trial.

    python benchmarks/search_workers.py [--trials 9] [--workers 3] [--kill] [--max-steps 30] [--model minilm-l6]
        [--out runs/search-workers]

Each trial trains --model on the packaged demo set for --max-steps steps (the default search space). Prints per
run: wall time, trials finished per worker, failed (killed) trials and retries; then the ratio of the two walls.
The workers share this machine's cores (each gets cores / W threads): on a small CPU the ratio says how much of a
trial is start-up and waiting rather than arithmetic, not what W machines would give.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def search(url: str, name: str, out: Path, trials: int, workers: int, kill: bool, common: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // workers))}
    cmd = [sys.executable, "-m", "sftlab", "tune", "-", *common, "--trials", str(trials), "--out", str(out),
           "--storage", url, "--study-name", name, "--heartbeat", "5"]
    start = time.perf_counter()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
             for _ in range(workers)]
    if kill:  # the first worker dies at its first trial, as a lost node would
        for line in procs[0].stderr:
            if re.match(r"trial \d+: .* -> ", line):
                procs[0].send_signal(signal.SIGKILL)
                break
    logs = [p.communicate()[1] for p in procs]
    wall = time.perf_counter() - start
    per_worker = [len(re.findall(r"^trial \d+: (dev|pruned)", log, re.M)) for log in logs]
    import optuna

    from sftlab.search_storage import open_storage

    study = optuna.load_study(study_name=name, storage=open_storage(url))
    states = Counter(t.state.name for t in study.trials)
    retries = sum("failed_trial" in t.system_attrs for t in study.trials)
    return {"wall_s": wall, "finished_per_worker": per_worker, "states": dict(states), "retries": retries,
            "exit": [p.returncode for p in procs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=9)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--kill", action="store_true", help="SIGKILL one of the W workers at its first trial")
    ap.add_argument("--max-steps", type=int, default=30)
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--out", default="runs/search-workers")
    args = ap.parse_args()
    from tests.conftest import find_initdb, postgres_server

    initdb = find_initdb()
    if not initdb:
        sys.exit("PostgreSQL is not installed (apt-get install postgresql)")
    demo = REPO / "src" / "sftlab" / "demo"
    common = [f"model.name={args.model}", f"data.train={demo / 'train.jsonl'}", f"data.dev={demo / 'dev.jsonl'}",
              f"train.max_steps={args.max_steps}", f"train.eval_every={args.max_steps}", "train.progress=false"]
    out = Path(args.out).resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with postgres_server(initdb) as url:
        one = search(url, "one", out / f"{stamp}-1", args.trials, 1, False, common)
        many = search(url, "many", out / f"{stamp}-{args.workers}", args.trials, args.workers, args.kill, common)
    for label, r in ((f"1 worker", one), (f"{args.workers} workers" + (", one killed" if args.kill else ""), many)):
        print(f"{label}: {r['wall_s']:.1f}s wall; trials finished per worker {r['finished_per_worker']}; states "
              f"{r['states']}; retried {r['retries']}; exit codes {r['exit']}")
    print(f"wall ratio 1 worker / {args.workers} workers: {one['wall_s'] / many['wall_s']:.2f}x "
          f"({os.cpu_count()} cores shared)")


if __name__ == "__main__":
    main()
