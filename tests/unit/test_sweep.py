"""`sftlab sweep`: every combination in its own process, a mean ± std table over the seed keys, resumable; k-shot
over seeds is its main use."""
from __future__ import annotations

import json
import statistics

from sftlab.cli import main
from tests.unit.test_compare import drop_output_dir


def test_sweep_k_shot_over_seeds_table_and_resume(tiny_overrides, tmp_path, capsys):
    out = tmp_path / "sw"
    argv = ["sweep", "-", *drop_output_dir(tiny_overrides), "train.epochs=1", "--over", "data.k_shot=2,4",
            "--over", "data.k_shot_seed=0,1", "--out", str(out), "--workers", "2"]
    assert main(argv) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].startswith("| data.k_shot | runs | dev accuracy mean ± std")
    assert [line.split("|")[1].strip() for line in table[2:]] == ["2", "4"]
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["mean_over"] == ["data.k_shot_seed"]
    names = [r["name"] for r in saved["rows"]]
    assert names == ["k_shot=2,k_shot_seed=0", "k_shot=2,k_shot_seed=1", "k_shot=4,k_shot_seed=0",
                     "k_shot=4,k_shot_seed=1"]
    # each run trained on its own sample: K rows per class, so K*2 rows of the toy data
    for name in names:
        k = int(name.split(",")[0].split("=")[1])
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["data"]["train"]["labels"] == {"negative": k, "positive": k}
        assert (out / name / "best").is_dir()
    for s in saved["settings"]:  # the table is the mean and sample std of its runs' metrics
        ms = [r["metric"] for r in saved["rows"] if r["name"].startswith(f"k_shot={s['setting']['data.k_shot']},")]
        assert s["runs"] == 2 and abs(s["mean"] - statistics.mean(ms)) < 1e-12
        assert abs(s["std"] - statistics.stdev(ms)) < 1e-12

    before = (out / names[0] / "summary.json").stat().st_mtime_ns
    assert main(argv + ["--resume"]) == 0  # nothing retrains
    assert (out / names[0] / "summary.json").stat().st_mtime_ns == before


def test_sweep_bad_arguments_fail_before_anything_runs(tiny_overrides, tmp_path, capsys):
    base = ["sweep", "-", *drop_output_dir(tiny_overrides)]
    cases = [(["--over", "data.k_shot"], "expected KEY=V1,V2"),
             (["--over", "data.k_shot=2", "--over", "data.k_shot=4"], "given twice"),
             (["--over", "data.k_shot=2,x"], "data.k_shot"),
             (["--over", "data.k_shot=2", "--mean-over", "train.seed"], "not an --over key"),
             (["--over", "data.k_shot=2", "--workers", "0"], "--workers 0")]
    for i, (extra, msg) in enumerate(cases):
        assert main(base + extra + ["--out", str(tmp_path / str(i))]) == 2
        assert msg in capsys.readouterr().err
        assert not (tmp_path / str(i)).exists()
