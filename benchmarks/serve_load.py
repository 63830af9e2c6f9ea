"""Load test of `sftlab serve` against a plain transformers.pipeline in FastAPI: same model, same requests, loopback.

    python benchmarks/serve_load.py --model HF_DIR [--serve-dir DIR] [--data FILE] [--requests 2000]
                                    [--concurrency 32] [--texts-per-request 1] [--sides sftlab,pipeline]
                                    [--runs 3] [--threads N] [--token T] [--sftlab-args "..."] [--json OUT]

Each side, each run: start the server as a child process on a free 127.0.0.1 port (its own session), wait for
GET /health, send --warmup requests (not counted), then exactly --requests POST /v1/classify requests with at most
--concurrency in flight (one aiohttp session, keep-alive), recording each request's status and latency; read the
server's peak RSS (VmHWM, summed over its process tree) and CPU time, SIGTERM it and check that it exits.
Runs are interleaved (sftlab, pipeline, sftlab, ...) so drift in machine speed hits both sides alike; the table
shows medians over runs and the status counts summed over runs.

Sides: `sftlab`: `python -m sftlab serve DIR --host 127.0.0.1 --port P [--token T] [--sftlab-args]`.
`pipeline`: benchmarks/_pipeline_server.py: `transformers.pipeline("text-classification", model=HF_DIR)` in a
FastAPI app under uvicorn, one request at a time (a plain `def` handler calling the pipeline under a lock).
Both get the same torch thread count (--threads) through OMP/MKL_NUM_THREADS and their own --threads flag
(torch.set_num_threads), unless --sftlab-args sets sftlab's. Default: all cores, torch's own default and what a
plain pipeline server gets. The best count differs by side: on the 2-core dev machine the baseline was faster at 1
thread (~50 req/s vs ~39 at 2) and sftlab serve at 2 (~136 vs ~97), so run both --threads 1 and --threads N and
report each. The load generator runs in this process on the same machine: its own CPU time per request is printed
so one can see how much of the machine it took.

Request i carries texts i*k .. i*k+k-1 (mod the data size) of --data, so both sides classify the same texts and
their labels are compared (agreement %, largest score difference). Checks: every request answered (no connection
error or timeout), no 5xx, no 4xx, every 2xx body has as many predictions as texts sent, each with a label from the
model's label set and a score in [0, 1]; the server exits after SIGTERM. The script exits non-zero if any fails.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
DATA_ROOT = Path(os.environ["SFTLAB_DATA_DIR"]) if os.environ.get("SFTLAB_DATA_DIR") else REPO.parent / "shared" / "data"
DEFAULT_DATA = DATA_ROOT / "glue" / "sst2" / "dev.tsv"
SIDES = ("sftlab", "pipeline")
NAMES = {"sftlab": "sftlab serve", "pipeline": "transformers.pipeline in FastAPI, one request at a time"}


# ---------------------------------------------------------------------------------------------------- inputs

def read_texts(path: Path, column: str) -> list[str]:
    """Texts from a .tsv/.csv (column), a .jsonl (key `column`, else `text`) or any other file (one per line)."""
    if path.suffix in (".tsv", ".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            rows = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",",
                                  quoting=csv.QUOTE_NONE if path.suffix == ".tsv" else csv.QUOTE_MINIMAL)
            if column not in (rows.fieldnames or []):
                sys.exit(f"{path}: no column {column!r} (columns: {rows.fieldnames}); pass --column")
            texts = [r[column] for r in rows]
    elif path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        texts = [r[column] if column in r else r["text"] for r in rows]
    else:
        texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = [t for t in texts if t.strip()]
    if not texts:
        sys.exit(f"{path}: no texts")
    return texts


def label_set(*dirs: Path) -> set[str]:
    """Every label name the model may answer: config.json's id2label values (or transformers' default names) plus
    sftlab.json's labels."""
    labels: set[str] = set()
    for d in dirs:
        for sub in (d, d / "best"):  # sftlab serve may be given a run dir, whose model is in best/
            if (sub / "config.json").is_file():
                cfg = json.loads((sub / "config.json").read_text())
                # transformers leaves its default names (LABEL_0, ...) out of config.json
                id2label = cfg.get("id2label") or {i: f"LABEL_{i}" for i in range(cfg.get("num_labels", 2))}
                labels |= {str(v) for v in id2label.values()}
            if (sub / "sftlab.json").is_file():
                labels |= {str(v) for v in json.loads((sub / "sftlab.json").read_text()).get("labels") or []}
    return labels


def request_texts(i: int, k: int, n_texts: int) -> list[int]:
    return [(i * k + j) % n_texts for j in range(k)]


# ---------------------------------------------------------------------------------------------------- servers

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_cmd(side: str, args: argparse.Namespace, port: int) -> list[str]:
    if side == "pipeline":
        cmd = [sys.executable, str(HERE / "_pipeline_server.py"), "--model", str(args.model), "--host", "127.0.0.1",
               "--port", str(port), "--threads", str(args.threads), "--handler", args.pipeline_handler]
        if args.max_length:
            cmd += ["--max-length", str(args.max_length)]
    else:
        extra = shlex.split(args.sftlab_args)
        threads = [] if any(a.startswith("--threads") for a in extra) else ["--threads", str(args.threads)]
        cmd = [sys.executable, "-m", "sftlab", "serve", str(args.serve_dir), "--host", "127.0.0.1", "--port", str(port),
               *threads, *extra]
    return cmd + (["--token", args.token] if args.token else [])


def server_env(side: str, args: argparse.Namespace) -> dict[str, str]:
    t = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t, "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "PYTHONUNBUFFERED": "1"}
    if side == "sftlab":  # runs from a checkout where sftlab is not pip-installed yet
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    return env


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def wait_health(proc: subprocess.Popen, base: str, headers: dict, timeout: float, log: Path) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before /health answered; log:\n{tail(log)}")
        try:
            with urllib.request.urlopen(urllib.request.Request(base + "/health", headers=headers), timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"/health did not answer 200 within {timeout:.0f} s; log:\n{tail(log)}")


def process_tree(pid: int):
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_cpu_s(pid: int) -> float:
    total = 0.0
    for p in process_tree(pid):
        try:
            c = p.cpu_times()
            total += c.user + c.system
        except Exception:  # exited in between
            pass
    return total


def tree_peak_rss_mb(pid: int) -> float:
    """Sum of VmHWM (each process's own peak resident set) over the server's process tree."""
    total_kb = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total_kb += int(line.split()[1])
        except OSError:
            pass
    return total_kb / 1024


def stop_server(proc: subprocess.Popen, timeout: float) -> tuple[int | None, float]:
    """SIGTERM; (exit code, seconds to exit), or (None, timeout) if it had to be SIGKILLed."""
    t0 = time.perf_counter()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    dt = time.perf_counter() - t0
    try:  # whatever is left of its session (workers it started), whether or not it exited cleanly
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if code is None:
        proc.wait()
    return code, dt


# ---------------------------------------------------------------------------------------------------- load

async def fire(url: str, headers: dict, payloads: list[bytes], concurrency: int, timeout: float) -> tuple[list, float]:
    """Send every payload once, at most `concurrency` in flight: [(status or None, latency s, body, error)], wall s."""
    import aiohttp

    records: list = [None] * len(payloads)
    todo = iter(range(len(payloads)))  # shared by the workers; one event loop, so no lock needed

    async def worker(session: aiohttp.ClientSession) -> None:
        for i in todo:
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=payloads[i], headers=headers) as r:
                    body = await r.read()
                records[i] = (r.status, time.perf_counter() - t0, body, None)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                records[i] = (None, time.perf_counter() - t0, b"", f"{type(e).__name__}: {e}")

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return records, wall


def percentile(sorted_xs: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return sorted_xs[max(0, math.ceil(p / 100 * len(sorted_xs)) - 1)] if sorted_xs else float("nan")


def check_records(records: list, k: int, n_texts: int, labels: set[str]) -> tuple[dict, dict, list[str]]:
    """Status counts, {text index: (label, score)} from the 2xx bodies, and the first few problems found."""
    counts = {"answered": 0, "2xx": 0, "4xx": 0, "5xx": 0, "other_status": 0, "conn_errors": 0, "bad_body": 0}
    preds: dict[int, tuple[str, float]] = {}
    problems: list[str] = []

    def problem(msg: str) -> None:
        if len(problems) < 5:
            problems.append(msg)

    for i, (status, _, body, err) in enumerate(records):
        if status is None:
            counts["conn_errors"] += 1
            problem(f"request {i}: no answer ({err})")
            continue
        counts["answered"] += 1
        klass = {2: "2xx", 4: "4xx", 5: "5xx"}.get(status // 100, "other_status")
        counts[klass] += 1
        if klass != "2xx":
            problem(f"request {i}: HTTP {status}: {body[:200]!r}")
            continue
        try:
            got = json.loads(body)["predictions"]
            idx = request_texts(i, k, n_texts)
            if not isinstance(got, list) or len(got) != len(idx):
                raise ValueError(f"{len(got) if isinstance(got, list) else type(got).__name__} predictions "
                                 f"for {len(idx)} texts")
            for j, p in zip(idx, got):
                label, score = str(p["label"]), float(p["score"])
                if labels and label not in labels:
                    raise ValueError(f"label {label!r} not in {sorted(labels)}")
                if not 0.0 <= score <= 1.0:
                    raise ValueError(f"score {score} outside [0, 1]")
                preds.setdefault(j, (label, score))
        except (ValueError, KeyError, TypeError) as e:
            counts["bad_body"] += 1
            problem(f"request {i}: bad body ({e}): {body[:200]!r}")
    return counts, preds, problems


def run_side(side: str, args: argparse.Namespace, texts: list[str], labels: set[str], run: int,
             logdir: Path) -> tuple[dict, dict]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {args.token}"} if args.token else {})}
    k, n = args.texts_per_request, len(texts)
    payloads = [json.dumps({"texts": [texts[j] for j in request_texts(i, k, n)]}).encode()
                for i in range(args.requests)]
    # Warm-up texts come from the far end of the data, so they are not the measured ones.
    warm = [json.dumps({"texts": [texts[-1 - (j % n)] for j in range(i * k, i * k + k)]}).encode()
            for i in range(args.warmup)]
    log = logdir / f"{side}-run{run}.log"
    cmd = server_cmd(side, args, port)
    print(f"[serve_load] run {run}/{args.runs} {side}: {shlex.join(cmd)}  (log {log})", file=sys.stderr, flush=True)
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, cwd=REPO, env=server_env(side, args), stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        startup = wait_health(proc, base, headers, args.startup_timeout, log)
        if warm:
            wrecs, _ = asyncio.run(fire(base + "/v1/classify", headers, warm, min(args.concurrency, len(warm)),
                                        args.request_timeout))
            bad = [r for r in wrecs if r[0] is None or r[0] // 100 != 2]
            if bad:
                print(f"[serve_load] warning: {len(bad)}/{len(warm)} warm-up requests failed, first: "
                      f"{bad[0][0]} {bad[0][2][:200]!r} {bad[0][3] or ''}", file=sys.stderr, flush=True)
        cpu0, client0 = tree_cpu_s(proc.pid), time.process_time()
        records, wall = asyncio.run(fire(base + "/v1/classify", headers, payloads, args.concurrency,
                                         args.request_timeout))
        client_cpu, server_cpu = time.process_time() - client0, tree_cpu_s(proc.pid) - cpu0
        peak_rss = tree_peak_rss_mb(proc.pid)
        alive = proc.poll() is None
    finally:
        code, stop_s = stop_server(proc, args.stop_timeout)
    counts, preds, problems = check_records(records, k, n, labels)
    lat = sorted(r[1] * 1e3 for r in records if r[0] is not None and r[0] // 100 == 2)
    result = {
        "tool": side, "run": run, "requests": len(records), **counts,
        "req_per_s": len(records) / wall, "texts_per_s": len(records) * k / wall, "wall_s": wall,
        "p50_ms": percentile(lat, 50), "p90_ms": percentile(lat, 90), "p99_ms": percentile(lat, 99),
        "max_ms": lat[-1] if lat else float("nan"), "startup_s": startup, "peak_rss_mb": peak_rss,
        "server_cpu_ms_per_req": 1e3 * server_cpu / len(records), "client_cpu_ms_per_req": 1e3 * client_cpu / len(records),
        "alive_after_load": alive, "exit_code": code, "stop_s": stop_s, "problems": problems,
    }
    print(f"[serve_load]   {side}: {result['req_per_s']:.1f} req/s, p50 {result['p50_ms']:.1f} ms, p99 "
          f"{result['p99_ms']:.1f} ms, {counts}, exit {exit_text(code)} after SIGTERM in {stop_s:.1f} s", file=sys.stderr, flush=True)
    for p in problems:
        print(f"[serve_load]   ! {p}", file=sys.stderr, flush=True)
    if problems or code is None:
        print(f"[serve_load]   server log tail:\n{tail(log)}", file=sys.stderr, flush=True)
    return result, preds


# ---------------------------------------------------------------------------------------------------- report

KEYS = ("req_per_s", "texts_per_s", "p50_ms", "p90_ms", "p99_ms", "startup_s", "peak_rss_mb",
        "server_cpu_ms_per_req", "client_cpu_ms_per_req")
COUNTS = ("requests", "answered", "2xx", "4xx", "5xx", "other_status", "conn_errors", "bad_body")


def failures(runs: list[dict]) -> list[str]:
    out = []
    for r in runs:
        where = f"{r['tool']} run {r['run']}"
        if r["answered"] != r["requests"]:
            out.append(f"{where}: {r['requests'] - r['answered']} of {r['requests']} requests unanswered")
        for key in ("5xx", "4xx", "other_status", "bad_body"):
            if r[key]:
                out.append(f"{where}: {r[key]} {key} responses")
        if not r["alive_after_load"]:
            out.append(f"{where}: the server had died by the end of the load")
        if r["exit_code"] is None:
            out.append(f"{where}: the server did not exit within the stop timeout after SIGTERM (SIGKILLed)")
    return out


def agreement(preds: dict[str, dict]) -> dict | None:
    if not all(s in preds for s in SIDES):
        return None
    a, b = preds["sftlab"], preds["pipeline"]
    common = sorted(set(a) & set(b))
    if not common:
        return None
    same = sum(a[i][0] == b[i][0] for i in common)
    return {"texts_compared": len(common), "same_label": same, "agreement_pct": 100 * same / len(common),
            "max_abs_score_diff": max(abs(a[i][1] - b[i][1]) for i in common if a[i][0] == b[i][0]) if same else None}


def provenance() -> str:
    """Commit of this checkout, and whether sftlab's serving code has uncommitted changes (figures depend on it)."""
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    commit = git("rev-parse", "--short", "HEAD") or "unknown commit"
    dirty = git("status", "--porcelain", "--", "src/sftlab/serve", "src/sftlab/cli.py")
    return commit + (" + uncommitted changes in src/sftlab/serve or cli.py" if dirty else "")


def exit_text(code: int | None) -> str:
    """uvicorn re-raises SIGTERM after its graceful shutdown, so a clean exit there reads as killed by SIGTERM."""
    if code is None:
        return "did not exit"
    return f"{signal.Signals(-code).name}" if code < 0 else str(code)


def report(runs: list[dict], agree: dict | None, args: argparse.Namespace, n_texts: int) -> dict:
    sides = [s for s in args.sides if any(r["tool"] == s for r in runs)]
    med = {s: {k: statistics.median(r[k] for r in runs if r["tool"] == s) for k in KEYS} for s in sides}
    tot = {s: {k: sum(r[k] for r in runs if r["tool"] == s) for k in COUNTS} for s in sides}
    served = ""
    if args.serve_dir != args.model:
        meta = args.serve_dir / "sftlab_export.json"
        fmt = json.loads(meta.read_text()).get("format") if meta.is_file() else None
        served = f" {args.serve_dir.name}" + (f" ({fmt} export)" if fmt else "")
    names = dict(NAMES, sftlab="sftlab serve" + served + (f" ({args.sftlab_args})" if args.sftlab_args else ""),
                 pipeline=NAMES["pipeline"] + (" (async handler)" if args.pipeline_handler == "async" else ""))
    print(f"\n{args.model.name if args.model.name != 'best' else args.model}: {args.requests} requests x "
          f"{args.texts_per_request} text(s) from {args.data.name} ({n_texts} texts), concurrency {args.concurrency}, "
          f"{args.threads} torch thread(s) per server, loopback, load generator in the same machine; medians of "
          f"{args.runs} run(s), status counts summed over runs")
    print(f"sftlab at {args.provenance}")
    print(f"1-minute load average (other jobs on this {os.cpu_count()}-core machine included): "
          f"{args.load_before:.1f} before, {os.getloadavg()[0]:.1f} after\n")
    print("| server | req/s | texts/s | p50 ms | p90 ms | p99 ms | answered | 2xx | 4xx | 5xx | conn err | bad body | "
          "startup s | peak RSS MB | server CPU ms/req | client CPU ms/req |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in sides:
        m, t = med[s], tot[s]
        print(f"| {names[s]} | {m['req_per_s']:.1f} | {m['texts_per_s']:.1f} | {m['p50_ms']:.1f} | {m['p90_ms']:.1f} | "
              f"{m['p99_ms']:.1f} | {t['answered']}/{t['requests']} | {t['2xx']} | {t['4xx']} | {t['5xx']} | "
              f"{t['conn_errors']} | {t['bad_body']} | {m['startup_s']:.1f} | {m['peak_rss_mb']:.0f} | "
              f"{m['server_cpu_ms_per_req']:.2f} | {m['client_cpu_ms_per_req']:.2f} |")
    ratios = {}
    if all(s in med for s in SIDES):
        s, p = med["sftlab"], med["pipeline"]
        ratios = {k: s[k] / p[k] for k in ("req_per_s", "p50_ms", "p99_ms", "peak_rss_mb", "server_cpu_ms_per_req")}
        print(f"| **sftlab / pipeline** | **{ratios['req_per_s']:.2f}x** | | **{ratios['p50_ms']:.2f}x** | | "
              f"**{ratios['p99_ms']:.2f}x** | | | | | | | | **{ratios['peak_rss_mb']:.2f}x** | "
              f"**{ratios['server_cpu_ms_per_req']:.2f}x** | |")
    if agree:
        diff = agree["max_abs_score_diff"]
        print(f"\nlabel agreement sftlab vs pipeline: {agree['same_label']}/{agree['texts_compared']} texts = "
              f"{agree['agreement_pct']:.2f}%" + (f"; largest score difference where the labels agree: {diff:.2e}"
                                                  if diff is not None else ""))
    print("\nper run:\n| server | run | req/s | p50 ms | p99 ms | max ms | 2xx | 5xx | conn err | peak RSS MB | "
          "exit after SIGTERM | stop s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        print(f"| {r['tool']} | {r['run']} | {r['req_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{r['max_ms']:.1f} | {r['2xx']} | {r['5xx']} | {r['conn_errors']} | {r['peak_rss_mb']:.0f} | "
              f"{exit_text(r['exit_code'])} | {r['stop_s']:.1f} |")
    return {"work": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "runs": runs, "medians": med, "totals": tot, "ratios_sftlab_over_pipeline": ratios, "agreement": agree}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True,
                   help="HF folder loadable by transformers.pipeline('text-classification')")
    p.add_argument("--serve-dir", type=Path, default=None, help="what `sftlab serve` is given (default: --model)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"texts to send (default {DEFAULT_DATA})")
    p.add_argument("--column", default="sentence", help="text column of a .tsv/.csv/.jsonl --data")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--texts-per-request", type=int, default=1)
    p.add_argument("--warmup", type=int, default=32, help="requests sent first and not counted")
    p.add_argument("--sides", default="sftlab,pipeline")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of each server, the same for both (default: all cores)")
    p.add_argument("--token", default=None, help="bearer token, passed to both servers and sent with each request")
    p.add_argument("--sftlab-args", default="", help="extra arguments for `sftlab serve`")
    p.add_argument("--pipeline-handler", choices=("sync", "async"), default="sync",
                   help="baseline handler: def + lock (default) or async def calling the pipeline directly")
    p.add_argument("--max-length", type=int, default=None,
                   help="pipeline side truncation (default: sftlab.json's max_length when present)")
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--request-timeout", type=float, default=120)
    p.add_argument("--stop-timeout", type=float, default=30, help="seconds a server gets to exit after SIGTERM")
    p.add_argument("--json", type=Path, default=None, help="also write runs, medians, ratios and agreement here")
    args = p.parse_args()
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        sys.exit("benchmarks/serve_load.py needs aiohttp: pip install -e '.[bench]'")
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if unknown := set(args.sides) - set(SIDES):
        sys.exit(f"unknown side(s) {sorted(unknown)}; choose from {SIDES}")
    args.model = args.model.resolve()
    args.serve_dir = (args.serve_dir or args.model).resolve()
    args.threads = args.threads or os.cpu_count() or 1
    if args.requests < 1 or args.concurrency < 1 or args.texts_per_request < 1:
        sys.exit("--requests, --concurrency and --texts-per-request must be >= 1")
    if not args.data.is_file():
        sys.exit(f"no data file {args.data}; pass --data or set SFTLAB_DATA_DIR")
    if args.max_length is None and (args.model / "sftlab.json").is_file():  # what sftlab serve truncates to
        args.max_length = json.loads((args.model / "sftlab.json").read_text()).get("max_length")
    texts = read_texts(args.data, args.column)
    labels = label_set(args.model, args.serve_dir)
    if not labels:
        print("[serve_load] warning: no label set found (config.json id2label / sftlab.json): labels not checked",
              file=sys.stderr)

    args.load_before = os.getloadavg()[0]
    args.provenance = provenance()
    runs, preds = [], {}
    with tempfile.TemporaryDirectory(prefix="sftlab-serve-load-") as tmp:
        for i in range(args.runs):  # interleaved, so drift in machine speed hits both sides alike
            for side in args.sides:
                try:
                    result, side_preds = run_side(side, args, texts, labels, i + 1, Path(tmp))
                except RuntimeError as e:
                    sys.exit(f"[serve_load] {side} run {i + 1}: {e}")
                runs.append(result)
                for j, v in side_preds.items():
                    preds.setdefault(side, {}).setdefault(j, v)
    result = report(runs, agreement(preds), args, len(texts))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    if bad := failures(runs):
        print("\nFAILED:\n" + "\n".join(f"- {b}" for b in bad), file=sys.stderr)
        sys.exit(1)
    print("\nchecks: every request answered, no 4xx/5xx, every body well-formed, every server exited after SIGTERM")


if __name__ == "__main__":
    main()
