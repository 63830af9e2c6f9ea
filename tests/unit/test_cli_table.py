"""Issue 15: every CLI verb on a fixed table of bad inputs. Each case must end with a non-zero exit and exactly one
stderr line `sftlab: error: ...` holding the expected words (the key or file, and the fix); never a traceback, and
no file the user wrote is changed. Cases are grouped by the issue's classes: silent wrong models (4), tracebacks
(5), slow or loose edges (6); the server's request-level cases are in test_serve_hardening.py."""
from __future__ import annotations

import hashlib
import json
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from sftlab.cli import main
from tests.conftest import make_rows, write_jsonl

pytestmark = pytest.mark.usefixtures("single_thread")

FAST = ["train.max_steps=2", "train.batch_size=8", "train.precision=fp32", "train.progress=false",
        "train.tensorboard=false"]


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory) -> dict:
    """A user folder with good and bad files, one finished run, and bad copies of it."""
    from sftlab.config import load_config
    from sftlab.train.loop import train

    u = tmp_path_factory.mktemp("user")
    write_jsonl(u / "train.jsonl", make_rows(16))
    write_jsonl(u / "other.jsonl", make_rows(16, seed=3, labels=("bad", "good")))
    (u / "dup.csv").write_text("text,text,label\na fine film,x,pos\na dull film,y,neg\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3, 4], "label": ["a", "b", "a", "b"]}), u / "ints.parquet")
    (u / "onlyconfig").mkdir()
    shutil.copy(tiny_model_dir / "config.json", u / "onlyconfig" / "config.json")
    (u / "notokenizer").mkdir()
    for f in tiny_model_dir.iterdir():
        if f.name in ("config.json", "model.safetensors"):
            shutil.copy(f, u / "notokenizer" / f.name)
    (u / "space.yaml").write_text("space: {train.lr: {low: 1, high: 0}}\n")
    (u / "afile").write_text("mine")
    run = train(load_config(None, [f"model.name={tiny_model_dir}", f"data.train={u / 'train.jsonl'}",
                                   f"data.dev={u / 'train.jsonl'}", *FAST, f"output_dir={u / 'run'}"]))
    trunc = u / "trunc"
    shutil.copytree(run, trunc)
    weights = trunc / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    for fmt in ("hf", "onnx"):  # export folders, and truncated copies of them
        assert main(["export", str(run), "--format", fmt, "--out", str(u / f"ex-{fmt}")]) == 0
        shutil.copytree(u / f"ex-{fmt}", u / f"ex-{fmt}-trunc")
        f = u / f"ex-{fmt}-trunc" / ("model.safetensors" if fmt == "hf" else "model.onnx")
        f.write_bytes(f.read_bytes()[:3000])
    return {"u": u, "model": str(tiny_model_dir), "run": str(run)}


@dataclass
class Case:
    argv: list  # {u} user folder, {model} tiny BERT, {run} a finished run, {port} a busy port
    words: tuple  # substrings the one error line must hold


T = ["-", "model.name={model}", "data.train={u}/train.jsonl", *FAST]
CASES = {
    # --- 4: silent wrong models, refused at load -------------------------------------------------------------------
    "train: model folder without tokenizer": Case(["train", "-", "model.name={u}/notokenizer",
                                                   "data.train={u}/train.jsonl", *FAST], ("no tokenizer files",)),
    "train: folder with only config.json": Case(["train", "-", "model.name={u}/onlyconfig",
                                                 "data.train={u}/train.jsonl", *FAST], ("model.name",)),
    "train: resume on other data": Case(["train", *T[:2], "data.train={u}/other.jsonl", *FAST, "--resume", "{run}"],
                                        ("data.train", "--force-resume")),
    "train: resume as another task": Case(["train", *T, "task=regression", "--resume", "{run}"],
                                          ("task", "--force-resume")),
    "train: repeated label name": Case(["train", *T, "data.labels=[negative,positive,positive]"],
                                       ("data.labels", "more than once")),
    "train: max_steps 0": Case(["train", *T, "train.max_steps=0"], ("train.max_steps", ">= 1")),
    "train: eval_every 0": Case(["train", *T, "train.eval_every=0"], ("train.eval_every", ">= 1")),
    "train: num_threads 0": Case(["train", *T, "train.num_threads=0"], ("train.num_threads", ">= 1")),
    "train: num_threads -1": Case(["train", *T, "train.num_threads=-1"], ("train.num_threads", ">= 1")),
    "train: lora option under full": Case(["train", *T, "strategy.r=8"], ("strategy.r", "not an option", "lora")),
    "train: head option under lora": Case(["train", *T, "strategy.name=lora", "strategy.head=mlp"],
                                          ("strategy.head", "head_only")),
    "train: two warmup settings": Case(["train", *T, "train.warmup_steps=5", "train.warmup_ratio=0.1"],
                                       ("warmup_steps", "warmup_ratio", "keep one")),
    "train: parquet text of integers": Case(["train", *T[:2], "data.train={u}/ints.parquet", *FAST],
                                            ("ints.parquet", "not text")),
    "train: CSV with a repeated column": Case(["train", *T[:2], "data.train={u}/dup.csv", *FAST],
                                              ("dup.csv", "appears 2 times")),
    "data check: repeated column": Case(["data", "check", "-", "model.name={model}", "data.train={u}/dup.csv"],
                                        ("dup.csv", "appears 2 times")),
    # --- 5: tracebacks where one line was promised -----------------------------------------------------------------
    "train: max_length past the positions": Case(["train", *T, "data.max_length=4096"],
                                                 ("data.max_length", "128 positions")),
    "data check: max_length past the positions": Case(["data", "check", "-", "model.name={model}",
                                                       "data.train={u}/train.jsonl", "data.max_length=4096"],
                                                      ("data.max_length", "128 positions")),
    "eval: truncated weights": Case(["eval", "{u}/trunc", "--data", "{u}/train.jsonl"], ("trunc/best", "truncated")),
    "predict: truncated weights": Case(["predict", "{u}/trunc", "--data", "{u}/train.jsonl"], ("truncated",)),
    "export: truncated weights": Case(["export", "{u}/trunc", "--format", "hf", "--out", "{u}/ex"], ("truncated",)),
    "serve: truncated weights": Case(["serve", "{u}/trunc", "--port", "0"], ("truncated",)),
    "eval: truncated hf export": Case(["eval", "{u}/ex-hf-trunc", "--data", "{u}/train.jsonl"], ("truncated",)),
    "predict: truncated onnx export": Case(["predict", "{u}/ex-onnx-trunc", "--data", "{u}/train.jsonl"],
                                           ("truncated",)),
    "serve: truncated hf export": Case(["serve", "{u}/ex-hf-trunc", "--port", "0"], ("truncated",)),
    "serve: truncated onnx export": Case(["serve", "{u}/ex-onnx-trunc", "--port", "0"], ("truncated",)),
    "generate: classifier export": Case(["generate", "{u}/ex-hf", "--prompt", "hi"], ("not a decoder",)),
    "predict --out under a file": Case(["predict", "{run}", "--data", "{u}/train.jsonl", "--out", "{u}/afile/p.jsonl"],
                                       ("--out", "cannot create")),
    "generate: encoder run": Case(["generate", "{run}", "--prompt", "hi"], ("not a decoder", "sftlab predict")),
    "chat: encoder run": Case(["chat", "{run}"], ("not a decoder",)),
    "eval: not a run": Case(["eval", "{u}", "--data", "{u}/train.jsonl"], ("no trained model",)),
    "eval: missing data": Case(["eval", "{run}", "--data", "{u}/nope.jsonl"], ("nope.jsonl", "not found")),
    "report: not a run": Case(["report", "{u}/notokenizer"], ("notokenizer",)),
    "compare: unknown strategy": Case(["compare", *T, "--strategies", "full,lorra", "--out", "{u}/cmp"],
                                      ("lorra",)),
    "tune: bad space": Case(["tune", *T, "data.dev={u}/train.jsonl", "--trials", "1", "--space", "{u}/space.yaml",
                             "--out", "{u}/tune"],
                            ("low", "high")),
    # --- 6: slow or loose edges ----------------------------------------------------------------------------------
    "train: mistyped packaged name": Case(["train", "-", "model.name=minilm-l7", "data.train={u}/train.jsonl"],
                                          ("did you mean minilm-l6",)),
    "train: unknown hub id offline": Case(["train", "-", "model.name=nobody/nothing", "data.train={u}/train.jsonl"],
                                          ("cannot be reached",)),
    "serve: busy port": Case(["serve", "{run}", "--port", "{port}"], ("already in use",)),
    "serve: nothing to serve": Case(["serve", "{u}/notokenizer", "--port", "0"], ("nothing to serve",)),
    "serve: bad setting": Case(["serve", "{run}", "--max-texts", "0"], ("--max-texts",)),
}


def _hashes(folder: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", list(CASES))
def test_every_verb_answers_bad_input_with_one_line(name, world, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # default output folders (runs/...) land here
    case = CASES[name]
    u = world["u"]
    n = torch.get_num_threads()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        subs = {"{u}": str(u), "{model}": world["model"], "{run}": world["run"],
                "{port}": str(busy.getsockname()[1])}
        argv = [a if not isinstance(a, str) else _sub(a, subs) for a in case.argv]
        before = _hashes(u)
        code = main(argv)
    torch.set_num_threads(n)
    out, err = capsys.readouterr()
    lines = [x for x in err.strip().splitlines() if x.startswith("sftlab: error:") or "Traceback" in x]
    assert code != 0, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0] == err.strip().splitlines()[-1], err
    for w in case.words:
        assert w in lines[0], lines[0]
    after = _hashes(u)
    assert {k: after.get(k) for k in before} == before, "a user file changed or vanished"


def _sub(arg: str, subs: dict) -> str:
    for k, v in subs.items():
        arg = arg.replace(k, v)
    return arg


def test_table_covers_every_verb():
    verbs = {c.argv[0] for c in CASES.values()}
    assert verbs >= {"train", "data", "eval", "predict", "export", "generate", "chat", "report", "compare", "tune",
                     "serve"}
    assert len(CASES) >= 30
    assert json.dumps(sorted(verbs))
