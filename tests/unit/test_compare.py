"""`sftlab compare`: each strategy in its own process on the same data, one table, runs kept, resumable."""
from __future__ import annotations

import json

from sftlab.cli import main


def drop_output_dir(overrides):
    return [o for o in overrides if not o.startswith("output_dir=")]


def test_compare_table_runs_and_resume(tiny_overrides, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "-", *drop_output_dir(tiny_overrides), "train.epochs=1", "--strategies", "full,lora,adapter",
            "--set", "lora:strategy.r=4", "--out", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].startswith("| strategy | dev accuracy | trainable params")
    assert [line.split("|")[1].strip() for line in table[2:]] == ["full", "lora", "adapter"]

    rows = {r["strategy"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    assert (out / "compare.md").read_text().strip() == "\n".join(table)
    assert rows["full"]["trainable_pct"] == 100
    assert rows["lora"]["trainable"] < rows["full"]["trainable"] and rows["adapter"]["trainable"] < rows["lora"]["trainable"]
    # small checkpoints: the adapters are a few percent of the full model's weights
    assert rows["lora"]["checkpoint_mb"] < 0.05 * rows["full"]["checkpoint_mb"]
    assert rows["adapter"]["checkpoint_mb"] < 0.05 * rows["full"]["checkpoint_mb"]
    assert all(r["peak_rss_mb"] > 100 and r["examples_per_s"] > 0 for r in rows.values())
    # the per-strategy override reached lora only, and the runs stay inspectable
    assert json.loads((out / "lora" / "best" / "adapter_config.json").read_text())["r"] == 4
    assert all((out / s / "best" / "sftlab.json").is_file() for s in rows)

    # --resume reuses finished strategies (no retraining: summary files untouched) and adds new ones
    before = (out / "full" / "summary.json").stat().st_mtime_ns
    assert main(argv[:-4] + ["--strategies", "full,head_only", "--out", str(out), "--resume"]) == 0
    assert (out / "full" / "summary.json").stat().st_mtime_ns == before
    assert [r["strategy"] for r in json.loads((out / "compare.json").read_text())["rows"]] == ["full", "head_only"]


def test_compare_refuses_a_used_out_dir_and_bad_sets(tiny_overrides, tmp_path, capsys):
    base = ["compare", "-", *drop_output_dir(tiny_overrides), "--strategies", "full,lora"]
    assert main(base + ["--set", "adapter:train.lr=1", "--out", str(tmp_path / "a")]) == 2
    assert "adapter is not in --strategies" in capsys.readouterr().err
    assert main(base + ["--set", "lora:train.lrr=1", "--out", str(tmp_path / "b")]) == 2
    assert "train.lrr" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()  # validated before anything was created or trained
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    assert main(base + ["--out", str(used)]) == 2
    assert "--resume" in capsys.readouterr().err and (used / "notes.txt").read_text() == "mine"
