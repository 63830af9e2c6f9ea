"""The catalogue of broken inputs (issue 7), each through the real CLI (`sftlab.cli.main`).

Every case writes its files into a fresh user folder, runs `sftlab train`, and must end with: a non-zero exit, exactly
one stderr line `sftlab: error: ...` (no traceback) that names the file:line or the config key and says what to do,
and every file of the user's byte-identical afterwards (hashed before and after). A UTF-8 BOM is not an error: those
files train. Row-level variants of these errors (and skip_invalid counting) are in test_bad_rows.py.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.conftest import make_chats, make_rows
from sftlab.cli import main

GOOD = b'{"text": "a fine film", "label": "pos"}\n{"text": "a dull film", "label": "neg"}\n'
FAST = ["train.max_steps=1", "train.batch_size=4", "train.precision=fp32", "train.progress=false",
        "train.num_threads=1", "train.tensorboard=false"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@dataclass
class Case:
    """`files`: name -> bytes in the user folder; `args`: the argv after `train` ({u} = the user folder, {model},
    {llama} = tiny models); `where` and `fix`: substrings the error line must hold ({u} expanded)."""
    files: dict
    args: list
    where: str
    fix: str


TRAIN = ["-", "model.name={model}", "data.train={u}/train.jsonl", *FAST]
CHAT = ["-", "model.name={llama}", "task=causal_lm", "data.train={u}/train.jsonl", *FAST]
ROWS = jsonl(make_rows(8))

CASES = {
    "non_utf8_bytes": Case({"train.jsonl": GOOD + b'{"text": "caf\xe9", "label": "pos"}\n'}, TRAIN,
                           "{u}/train.jsonl:3: not valid UTF-8", "re-save the file as UTF-8"),
    "empty_file": Case({"train.jsonl": b""}, TRAIN, "{u}/train.jsonl: file is empty", "needs at least one data row"),
    "missing_column": Case({"train.csv": b"sentence,label\na fine film,pos\na dull film,neg\n"},
                           ["-", "model.name={model}", "data.train={u}/train.csv", *FAST],
                           "{u}/train.csv: no column 'text' (data.text)", "columns are ['sentence', 'label']"),
    "empty_text": Case({"train.jsonl": GOOD + b'{"text": "", "label": "pos"}\n'}, TRAIN,
                       "{u}/train.jsonl:3: empty text (data.text)", "fix the row or set data.skip_invalid=true"),
    "unknown_label": Case({"train.jsonl": ROWS, "dev.jsonl": jsonl(make_rows(3) + [{"text": "meh", "label": "so-so"}])},
                          TRAIN + ["data.dev={u}/dev.jsonl"], "{u}/dev.jsonl:4: unknown label 'so-so'",
                          "data.labels"),
    "label_id_out_of_range": Case({"train.jsonl": GOOD + b'{"text": "x", "label": 5}\n'},
                                  TRAIN + ["data.labels=[neg, pos]"], "{u}/train.jsonl:3: label id 5 out of range 0..1",
                                  "fix the row or set data.skip_invalid=true"),
    "nan_regression_target": Case({"train.csv": b"text,label\na,0.5\nb,1.5\nc,nan\n"},
                                  ["-", "model.name={model}", "task=regression", "data.train={u}/train.csv", *FAST],
                                  "{u}/train.csv:4: regression target is nan", "targets must be finite"),
    "ragged_tsv_row": Case({"train.tsv": b"text\tlabel\ngood\tpos\na\ttab\tpos\nbad\tneg\n"},
                           ["-", "model.name={model}", "data.train={u}/train.tsv", *FAST],
                           "{u}/train.tsv:3: has 3 fields, the header has 2", "fix the row or its tabs/quotes"),
    "malformed_json_line": Case({"train.jsonl": GOOD + b'{"text": "a", "label": \n'}, TRAIN,
                                "{u}/train.jsonl:3: malformed JSON line", "each line must be one JSON object"),
    "wrong_chat_role": Case({"train.jsonl": jsonl(make_chats(2) + [{"messages": [
        {"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]}])}, CHAT,
        "{u}/train.jsonl:3: unknown role 'bot' (messages[1])", "use "),
    "empty_assistant_turn": Case({"train.jsonl": jsonl(make_chats(2) + [{"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}])}, CHAT,
        "{u}/train.jsonl:3: empty assistant turn", "give the reply text or remove the turn"),
    "over_max_length": Case({"train.jsonl": jsonl(make_chats(2) + [{"messages": [
        {"role": "user", "content": "hello there " * 40}, {"role": "assistant", "content": "sure"}]}])},
        CHAT + ["data.max_length=64", "data.overlength=error"], "{u}/train.jsonl:3: ",
        "set data.overlength=truncate|drop"),
    "nonexistent_path": Case({}, TRAIN, "{u}/train.jsonl: file not found", "check data.train/dev/test and data.dir"),
    "output_dir_not_writable": Case({"train.jsonl": ROWS, "notes.txt": b"mine"}, TRAIN + ["output_dir={u}/notes.txt/run"],
                                    "output_dir {u}/notes.txt/run: cannot write", "choose a writable folder"),
    "existing_run_dir": Case({"train.jsonl": ROWS, "old/config.yaml": b"task: classification\n",
                              "old/metrics.jsonl": b'{"step": 1}\n'}, TRAIN + ["output_dir={u}/old"],
                             "output_dir {u}/old exists and is not empty", "--resume {u}/old"),
    "unknown_config_key": Case({"train.jsonl": ROWS, "run.yaml": b"train:\n  lrr: 0.001\n"},
                               ["{u}/run.yaml", "model.name={model}", "data.train={u}/train.jsonl"],
                               "train.lrr: unknown key", "did you mean train.lr?"),
    "wrong_type_in_config": Case({"train.jsonl": ROWS, "run.yaml": b"train:\n  batch_size: many\n"},
                                 ["{u}/run.yaml", "model.name={model}", "data.train={u}/train.jsonl"],
                                 "train.batch_size: ", "valid integer"),
    "invalid_yaml": Case({"run.yaml": b"train: [1, 2\n"}, ["{u}/run.yaml"], "{u}/run.yaml: not valid YAML",
                         "while parsing"),
    "resume_not_a_run": Case({"train.jsonl": ROWS, "notes.txt": b"mine"}, TRAIN + ["--resume", "{u}"],
                             "--resume {u}: not a run directory", "(no config.yaml)"),
    "impossible_combination": Case({"train.jsonl": ROWS}, TRAIN + ["data.packing=true"], "data.packing",
                                   "remove it or set task=causal_lm"),
}


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", CASES, ids=list(CASES))
def test_broken_input_is_one_line_with_location_and_fix(name, tmp_path, tiny_model_dir, tiny_llama_dir, capsys):
    case = CASES[name]
    user = tmp_path / "user"
    user.mkdir()
    for rel, content in case.files.items():
        (user / rel).parent.mkdir(parents=True, exist_ok=True)
        (user / rel).write_bytes(content)
    fill = lambda s: s.format(u=user, model=tiny_model_dir, llama=tiny_llama_dir)  # noqa: E731
    argv = [fill(a) for a in case.args]
    if "--resume" not in argv and not any(a.startswith("output_dir=") for a in argv):
        argv.append(f"output_dir={tmp_path / 'out' / 'run'}")
    before = snapshot(user)
    code = main(["train", *argv])
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("sftlab: error: ")]
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], err
    line = errors[0]
    assert fill(case.where) in line, line
    assert fill(case.fix) in line, line
    assert snapshot(user) == before


@pytest.mark.parametrize("ext", ["jsonl", "csv"])
def test_utf8_bom_is_tolerated(ext, tmp_path, tiny_model_dir, capsys):
    user = tmp_path / "user"
    user.mkdir()
    rows = make_rows(8)
    if ext == "jsonl":
        body = jsonl(rows)
    else:
        body = ("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows)).encode()
    (user / f"train.{ext}").write_bytes(b"\xef\xbb\xbf" + body)
    before = snapshot(user)
    code = main(["train", "-", f"model.name={tiny_model_dir}", f"data.train={user}/train.{ext}", *FAST,
                 f"output_dir={tmp_path / 'run'}"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip().splitlines()[-1] == str(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["data"]["train"]["rows"] == 8
    assert snapshot(user) == before


def test_the_catalogue_covers_the_issue():
    assert len(CASES) >= 15
