"""`sftlab report`: one self-contained HTML file per call, on tiny runs trained once per module."""
from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import pytest

from sftlab.cli import main
from sftlab.config import load_config
from sftlab.train.loop import train
from tests.conftest import make_chats, make_rows, write_jsonl

XSS = "<script>alert(1)</script>"
PNG = b"\x89PNG\r\n\x1a\n"


def base_overrides(model_dir, folder: Path) -> list[str]:
    """Like conftest's tiny_overrides, with a dev set where one text is both labels: identical inputs get one
    prediction, so that text is a mistake, and with at most 10 dev rows it is among the 20 worst errors."""
    train_f = write_jsonl(folder / "train.jsonl", make_rows(64))
    rows = make_rows(8, seed=1) + [{"text": f"the film was {XSS}", "label": y} for y in ("negative", "positive")]
    dev_f = write_jsonl(folder / "dev.jsonl", rows)
    return [f"model.name={model_dir}", f"data.train={train_f}", f"data.dev={dev_f}", "train.epochs=1",
            "train.batch_size=8", "train.lr=1e-3", "train.precision=fp32", "train.progress=false",
            "train.eval_every=4"]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Two finished classification runs (full, lora) and their overrides; tests work on copies."""
    folder = tmp_path_factory.mktemp("report-runs")
    over = base_overrides(tiny_model_dir, folder)
    out = {"overrides": over}
    for name, extra in (("full", []), ("lora", ["strategy.name=lora"])):
        out[name] = train(load_config(None, over + extra + [f"output_dir={folder / name}"]))
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints"))
    return dst


def report(argv: list[str], capsys) -> tuple[Path, str]:
    assert main(["report", *argv]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    path = Path(out[-1])  # contract: the HTML file's path is the last stdout line
    return path, path.read_text(encoding="utf-8")


def plots(html: str) -> dict[str, str]:
    found = dict(re.findall(r'<img class="plot" data-plot="([^"]+)"[^>]*src="data:image/png;base64,([^"]+)"', html))
    for b64 in found.values():
        assert base64.b64decode(b64).startswith(PNG)
    return found


def test_one_run_report_has_plots_tables_config_and_escapes_texts(runs, tmp_path, capsys):
    run = copy_run(runs["full"], tmp_path / "full")
    path, html = report([str(run)], capsys)
    assert path == run / "report.html"
    # the dev-set error analysis was made for the report and kept in the run directory
    analysis = json.loads((run / "analysis" / "dev.json").read_text())
    assert analysis["confusion"]["labels"] == ["negative", "positive"]
    assert set(plots(html)) == {"loss", "dev", "lr", "throughput", "confusion-full", "reliability-full"}
    assert '<table id="summary">' in html and "<th scope=\"col\">full</th>" in html
    assert re.search(r"<th scope=\"row\">dev accuracy</th><td class=\"num\">\d\.\d{4}</td>", html)
    assert re.search(r"trainable params</th><td class=\"num\">[\d,]+ \(100\.0000%\)</td>", html)
    for cls in ("metrics", "per-class", "by-length", "worst"):
        assert f'<table class="{cls}">' in html
    assert '<pre class="config">' in html and "precision: fp32" in html
    assert "--baselines</code>" in html  # no baselines.json yet: the command that makes it
    # user text is escaped everywhere, and the page itself runs no script at all
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert XSS not in html and "<script" not in html.lower()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # self-contained
    # the default output is ours: a second report replaces it, reusing the analysis
    mtime = (run / "analysis" / "dev.json").stat().st_mtime_ns
    assert report([str(run)], capsys)[0] == path
    assert (run / "analysis" / "dev.json").stat().st_mtime_ns == mtime
    # ...unless it is of another best model (the run went on): then it is made anew
    analysis["step"] = 999
    (run / "analysis" / "dev.json").write_text(json.dumps(analysis))
    report([str(run)], capsys)
    best_step = json.loads((run / "best" / "sftlab.json").read_text())["step"]
    assert json.loads((run / "analysis" / "dev.json").read_text())["step"] == best_step != 999


def test_two_runs_side_by_side_with_baselines(runs, tmp_path, capsys, monkeypatch):
    a = copy_run(runs["full"], tmp_path / "a" / "run")
    b = copy_run(runs["lora"], tmp_path / "b" / "run")  # same directory name: parents tell them apart
    dev = next(o for o in runs["overrides"] if o.startswith("data.dev=")).split("=", 1)[1]
    assert main(["eval", str(a), "--data", dev, "--baselines"]) == 0  # trains the from-scratch twin
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    path, html = report([str(a), str(b)], capsys)
    assert re.fullmatch(r"runs/report-\d{8}-\d{6}\.html", str(path))
    assert set(plots(html)) == {"loss", "dev", "lr", "throughput", "confusion-a/run", "reliability-a/run",
                                "confusion-b/run", "reliability-b/run"}
    assert '<th scope="col">a/run</th><th scope="col">b/run</th>' in html
    assert re.search(r"<th scope=\"row\">strategy</th><td class=\"\">full</td><td class=\"\">lora</td>", html)
    # baselines of run a in their fixed order; run b says how to make them
    table = html.split('<table class="baselines">')[1].split("</table>")[0]
    names = re.findall(r"<tr><td class=\"\">([^<]+)</td>", table)
    assert names == ["majority class (negative)", "from-scratch twin", "fine-tuned (this run)"] or \
        names == ["majority class (positive)", "from-scratch twin", "fine-tuned (this run)"]
    assert html.count('<table class="baselines">') == 1 and html.count("--baselines</code>") == 1
    assert html.count('<pre class="config">') == 2


def test_regression_and_missing_pieces_say_so(tiny_model_dir, tmp_path, capsys):
    tr = write_jsonl(tmp_path / "tr.jsonl", [{"text": r["text"], "label": float(r["label"] == "positive")}
                                             for r in make_rows(32)])
    run = train(load_config(None, [f"model.name={tiny_model_dir}", f"data.train={tr}", "task=regression",
                                   "train.epochs=1", "train.batch_size=8", "train.precision=fp32",
                                   "train.progress=false", f"output_dir={tmp_path / 'reg'}"]))
    path, html = report([str(run)], capsys)  # no dev set: no dev curve, no analysis, no baselines
    assert set(plots(html)) == {"loss", "lr", "throughput"}
    assert "No dev metrics logged" in html and "no error analysis" in html and "--baselines</code>" in html
    # an analysis written by `sftlab eval` on another file shows the regression columns
    (run / "analysis").mkdir()
    (run / "analysis" / "other.json").write_text(json.dumps({
        "task": "regression", "metrics": {"pearson": 0.5, "spearman": 0.4, "mse": 0.1}, "by_length": [],
        "worst": [{"text": "a <b>bold</b> claim", "target": 1.0, "prediction": 0.25, "abs_error": 0.75}]}))
    html = report([str(run)], capsys)[1]
    assert "<th>abs_error</th>" in html and "a &lt;b&gt;bold&lt;/b&gt; claim" in html
    assert '<td class="num">0.7500</td>' in html
    # a run that has only started (config.yaml only) still renders, with notes instead of figures
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run / "config.yaml", bare / "config.yaml")
    html = report([str(bare), "--no-eval"], capsys)[1]
    assert plots(html) == {} and "training has not finished" in html and "No training loss logged" in html


def test_causal_lm_run_renders_outputs_and_decoder_baselines(tiny_llama_dir, tmp_path, capsys):
    tr = write_jsonl(tmp_path / "train.jsonl", make_chats(24))
    dev = write_jsonl(tmp_path / "dev.jsonl", make_chats(8, seed=1))
    run = train(load_config(None, ["task=causal_lm", f"model.name={tiny_llama_dir}", f"data.train={tr}",
                                   f"data.dev={dev}", "data.max_length=160", "train.epochs=1", "train.batch_size=8",
                                   "train.precision=fp32", "train.progress=false", f"output_dir={tmp_path / 'lm'}"]))
    html = report([str(run), "--out", str(tmp_path / "before.html")], capsys)[1]
    assert f"sftlab eval {run} --data {dev}" in html  # decoders are not generated from by the report
    assert main(["eval", str(run), "--data", str(dev), "--labels", "positive,negative", "--max-new-tokens", "3",
                 "--fp32"]) == 0
    (run / "baselines.json").write_text(json.dumps({str(dev): {
        "fine_tuned": {"label_accuracy": 0.75, "rouge_l": 0.5, "examples": 8},
        "icl_4_shot": {"label_accuracy": 0.5, "rouge_l": 0.25, "examples": 8},
        "zero_shot": {"label_accuracy": 0.25, "rouge_l": 0.125, "examples": 8}}}))
    capsys.readouterr()
    path, html = report([str(run), "--out", str(tmp_path / "out" / "lm.html")], capsys)
    assert path == tmp_path / "out" / "lm.html"
    assert set(plots(html)) == {"loss", "dev", "lr", "throughput"}  # no confusion/reliability for text output
    worst = html.split('<table class="worst">')[1].split("</table>")[0]
    assert "<th>reference</th><th>output</th>" in worst and worst.count("<tr>") == 9  # header + 8 outputs
    assert "&lt;|im_start|&gt;" in worst  # the rendered prompt, escaped
    names = re.findall(r"<tr><td class=\"\">([^<]+)</td>", html.split('<table class="baselines">')[1])
    assert names[:3] == ["zero-shot (base model)", "4-shot ICL (base model)", "fine-tuned (this run)"]
    assert "<th scope=\"row\">tokens/s</th>" in html


def test_existing_out_is_refused_unless_overwrite(runs, tmp_path, capsys):
    out = tmp_path / "mine.html"
    out.write_text("keep me")
    assert main(["report", str(runs["full"]), "--out", str(out), "--no-eval"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"sftlab: error: --out {out} exists; choose another file or pass --overwrite to replace it"
    assert out.read_text() == "keep me"
    assert report([str(runs["full"]), "--out", str(out), "--overwrite", "--no-eval"], capsys)[0] == out
    assert out.read_text().startswith("<!DOCTYPE html>")


def test_not_a_run_dir_is_one_line_and_nothing_is_written(runs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for bad, why in ((tmp_path / "empty", "not a run directory"), (tmp_path / "nope", "no such directory")):
        assert main(["report", str(runs["full"]), str(bad), "--out", str(tmp_path / "r.html")]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
        assert captured.err.startswith(f"sftlab: error: {bad}: {why}")
    assert not (tmp_path / "r.html").exists()
