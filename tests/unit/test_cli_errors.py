"""User errors through the CLI end with one `sftlab: error:` line and exit 2, never a traceback."""
from __future__ import annotations

import os

import pytest

from sftlab.cli import main


def one_error_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sftlab: error: "), err
    return err[0]


def test_missing_config_file(capsys, tmp_path):
    assert "config file not found" in one_error_line(capsys, ["train", str(tmp_path / "nope.yaml")])


def test_eval_of_a_folder_without_a_model(capsys, tmp_path):
    assert "no trained model here" in one_error_line(capsys, ["eval", str(tmp_path), "--data", "x.jsonl"])


def test_resume_of_a_folder_that_is_not_a_run(capsys, tmp_path, tiny_overrides):
    msg = one_error_line(capsys, ["train", "-", *tiny_overrides, "--resume", str(tmp_path)])
    assert "not a run directory" in msg


def test_unknown_strategy_lists_the_available_ones(capsys, tiny_overrides):
    msg = one_error_line(capsys, ["train", "-", *tiny_overrides, "strategy.name=lorra"])
    assert "strategy.name" in msg and "full" in msg


def test_model_folder_without_config(capsys, tmp_path, tiny_overrides):
    (tmp_path / "m").mkdir()
    msg = one_error_line(capsys, ["train", "-", *tiny_overrides, f"model.name={tmp_path / 'm'}"])
    assert "no config.json" in msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_dir(capsys, tmp_path, tiny_overrides):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    msg = one_error_line(capsys, ["train", "-", *tiny_overrides, f"output_dir={ro / 'run'}"])
    assert "cannot write" in msg


def test_output_dir_that_is_a_file(capsys, tmp_path, tiny_overrides):
    f = tmp_path / "file"
    f.write_text("mine")
    msg = one_error_line(capsys, ["train", "-", *tiny_overrides, f"output_dir={f / 'run'}"])
    assert "cannot write" in msg and f.read_text() == "mine"


def test_dry_run_of_overrides_only(capsys, tiny_overrides):
    assert main(["train", "-", *tiny_overrides, "--dry-run"]) == 0
    assert "batch_size: 8" in capsys.readouterr().out
