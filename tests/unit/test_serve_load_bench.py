"""benchmarks/serve_load.py end to end on its pipeline side: a tiny classifier behind the baseline FastAPI server,
40 requests at concurrency 4, every check passing and the table printed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_classifier(tiny_model_dir, tmp_path_factory) -> Path:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-cls")
    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def test_pipeline_side_smoke(tiny_classifier, tmp_path):
    pytest.importorskip("aiohttp")
    data = tmp_path / "dev.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"the film was {w}\t{i % 2}\n" for i, w in
                                                    enumerate(["good", "bad", "fine", "awful", "great", "dull"])))
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "serve_load.py"), "--model", str(tiny_classifier), "--data", str(data),
         "--sides", "pipeline", "--requests", "40", "--concurrency", "4", "--texts-per-request", "2", "--warmup", "4",
         "--threads", "1", "--token", "t0ken", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| transformers.pipeline in FastAPI" in proc.stdout and "checks: every request answered" in proc.stdout
    result = json.loads(out.read_text())
    (run,) = result["runs"]
    assert run["requests"] == run["answered"] == run["2xx"] == 40
    assert run["5xx"] == run["4xx"] == run["conn_errors"] == run["bad_body"] == 0
    assert run["req_per_s"] > 0 and 0 < run["p50_ms"] <= run["p99_ms"]
    assert run["exit_code"] is not None  # the server went away after SIGTERM


def test_failures_are_reported(tiny_classifier, tmp_path):
    """A 5xx or an unanswered request fails the run: the check itself, on made-up records."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import serve_load
    finally:
        sys.path.pop(0)
    ok = json.dumps({"predictions": [{"label": "LABEL_1", "score": 0.9}]}).encode()
    records = [(200, 0.01, ok, None), (500, 0.01, b"boom", None), (None, 0.01, b"", "ServerDisconnectedError"),
               (200, 0.01, json.dumps({"predictions": []}).encode(), None),
               (200, 0.01, json.dumps({"predictions": [{"label": "nope", "score": 0.5}]}).encode(), None)]
    counts, preds, problems = serve_load.check_records(records, 1, 10, serve_load.label_set(tiny_classifier))
    assert counts == {"answered": 4, "2xx": 3, "4xx": 0, "5xx": 1, "other_status": 0, "conn_errors": 1, "bad_body": 2}
    assert preds == {0: ("LABEL_1", 0.9)} and len(problems) == 4
    run = {"tool": "x", "run": 1, "requests": 5, **counts, "alive_after_load": True, "exit_code": 0}
    assert len(serve_load.failures([run])) == 3  # unanswered, 5xx, bad bodies
