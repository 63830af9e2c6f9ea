"""Load test of one served multitask model answering every task (issue 18): `sftlab serve RUN_OR_EXPORT`, requests
cycling over the tasks with each task's own dev texts (pairs for pair tasks), loopback.

    SFTLAB_DATA_DIR=../shared/data python benchmarks/serve_multitask_load.py --serve-dir RUN_DIR
        [--requests 2000] [--concurrency 32] [--texts-per-request 1] [--threads 2] [--runs 3]

Request i goes to task i mod T (T tasks, from GET /v1/tasks) with that task's next dev texts (the run's config says
each task's dev file and columns). Per run: start the server (benchmarks/serve_load.py's helpers), wait for /health,
50 warm-up requests, then the requests at the given concurrency; checks: every answer 200 with one prediction per
text, labels from that task's label set (a value for a regression task). Prints requests/s, latency p50/p99 per
task and overall, the server's peak RSS and CPU seconds per request, medians over runs.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import yaml

from serve_load import fire, free_port, percentile, server_env, stop_server, tree_cpu_s, tree_peak_rss_mb, wait_health

REPO = Path(__file__).resolve().parents[1]


def task_texts(run: Path, n: int = 400) -> dict[str, list]:
    """Each task's first n dev inputs (texts, or [text, pair] pairs), read with its own columns."""
    sys.path.insert(0, str(REPO / "src"))
    from sftlab.data.examples import load_split
    from sftlab.eval.evaluate import _data_config

    cfg_file = run / "config.yaml" if (run / "config.yaml").is_file() else run.parent / "config.yaml"
    saved = yaml.safe_load(cfg_file.read_text())
    out = {}
    for name, entry in saved["tasks"].items():
        dcfg = _data_config(run, {"dir": (saved.get("data") or {}).get("dir")}, name)
        split, _ = load_split(dcfg, entry["dev"], entry.get("task", "classification"), None, need_label=False)
        out[name] = [e.text if e.text_pair is None else [e.text, e.text_pair] for e in split.examples[:n]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve-dir", required=True, type=Path)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--texts-per-request", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    args.token, args.sftlab_args, args.max_length = None, "", None
    texts = task_texts(args.serve_dir)
    names, k = list(texts), args.texts_per_request
    plan = [(names[i % len(names)], [texts[names[i % len(names)]][(i // len(names) * k + j) %
                                                                    len(texts[names[i % len(names)]])]
                                     for j in range(k)]) for i in range(args.requests)]
    payloads = [json.dumps({"task": t, "texts": x}).encode() for t, x in plan]
    warm = [json.dumps({"task": names[i % len(names)], "texts": texts[names[i % len(names)]][-k:]}).encode()
            for i in range(50)]
    results = []
    for r in range(args.runs):
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = Path(tempfile.mkstemp(prefix="mt-serve-", suffix=".log")[1])
        cmd = [sys.executable, "-m", "sftlab", "serve", str(args.serve_dir), "--host", "127.0.0.1", "--port",
               str(port), "--threads", str(args.threads)]
        proc = subprocess.Popen(cmd, env=server_env("sftlab", args), stdout=log.open("w"), stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=REPO)
        try:
            wait_health(proc, base, {}, 180, log)
            with urllib.request.urlopen(base + "/v1/tasks") as f:
                listed = {t["name"]: t for t in json.load(f)["tasks"]}
            headers = {"Content-Type": "application/json"}
            asyncio.run(fire(base + "/v1/classify", headers, warm, args.concurrency, 60))
            cpu0 = tree_cpu_s(proc.pid)
            records, wall = asyncio.run(fire(base + "/v1/classify", headers, payloads, args.concurrency, 120))
            cpu = tree_cpu_s(proc.pid) - cpu0
            peak = tree_peak_rss_mb(proc.pid)
        finally:
            code, _ = stop_server(proc, 30)
        bad = 0
        lat: dict[str, list[float]] = {n: [] for n in names}
        for (task, x), (status, seconds, body, err) in zip(plan, records):
            ok = status == 200
            if ok:
                preds = json.loads(body)["predictions"]
                labels = listed[task]["labels"]
                ok = len(preds) == len(x) and all((p["label"] in labels) if labels else p["label"] is None
                                                  for p in preds)
            bad += not ok
            lat[task].append(seconds)
        allx = sorted(s for v in lat.values() for s in v)
        results.append({"rps": len(plan) / wall, "p50_ms": 1000 * percentile(allx, 50),
                        "p99_ms": 1000 * percentile(allx, 99), "bad": bad, "peak_mb": peak,
                        "cpu_ms_per_request": 1000 * cpu / len(plan), "exit": code,
                        "per_task_p50_ms": {n: 1000 * percentile(sorted(v), 50) for n, v in lat.items()}})
        print(f"run {r}: {results[-1]['rps']:.1f} req/s, p50 {results[-1]['p50_ms']:.1f} ms, "
              f"p99 {results[-1]['p99_ms']:.1f} ms, bad {bad}", file=sys.stderr)
    med = {key: statistics.median(x[key] for x in results) for key in ("rps", "p50_ms", "p99_ms", "peak_mb",
                                                                       "cpu_ms_per_request")}
    print(f"| tasks | requests/s | p50 ms | p99 ms | peak RSS MB | CPU ms/request | failed |\n|---|---:|---:|---:|---:|"
          f"---:|---:|\n| {', '.join(names)} | {med['rps']:.1f} | {med['p50_ms']:.1f} | {med['p99_ms']:.1f} | "
          f"{med['peak_mb']:.0f} | {med['cpu_ms_per_request']:.2f} | {sum(x['bad'] for x in results)} |")
    print("per task p50 ms (last run): " + ", ".join(f"{n} {v:.1f}" for n, v in results[-1]["per_task_p50_ms"].items()))
    print(json.dumps({"median": med, "runs": results}))
    if any(x["bad"] for x in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
