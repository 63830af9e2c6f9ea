"""`sftlab export` and `sftlab predict EXPORT_DIR` as equations on tiny in-process runs.

Every export's logits == the run's in-memory logits (`load_trained`): hf/merged/peft within 1e-5, onnx 1e-4, each
read back with the plain library (transformers, peft, onnxruntime), not only through sftlab's runtime; int8 agrees
on the argmax for most rows and stays close. Refusals are one line. No export folder holds a pickle.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sftlab.cli import main
from sftlab.config import load_config
from sftlab.errors import ExportError
from sftlab.eval.evaluate import load_trained
from sftlab.export import export
from sftlab.export.runtime import load_exported
from sftlab.train.loop import train
from tests.conftest import make_chats, make_rows, write_jsonl

TEXTS = [r["text"] for r in make_rows(24, seed=5)] + ["ok", "the " + "very " * 40 + "long film was great"]
PICKLE = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict:
    """Tiny BERT classifier runs (full, LoRA, DoRA, bottleneck adapter), fp32, trained until they tell the classes apart."""
    root = tmp_path_factory.mktemp("export-runs")
    data = {"train": write_jsonl(root / "train.jsonl", make_rows(48)), "dev": write_jsonl(root / "dev.jsonl",
                                                                                             make_rows(40, seed=1))}
    base = [f"model.name={tiny_model_dir}", f"data.train={data['train']}", f"data.dev={data['dev']}",
            "data.max_length=32", "train.max_steps=60", "train.warmup_ratio=0", "train.metric=loss",
            "train.batch_size=8", "train.lr=3e-3", "train.precision=fp32",
            "train.progress=false", "train.num_threads=1", "train.tensorboard=false", "strategy.r=4",
            "strategy.reduction=4"]
    # base sets lora's r and the adapter's reduction; each run keeps its own strategy's options (as compare does)
    out = {name: train(load_config(None, base + [f"strategy.name={name}", f"output_dir={root / name}"],
                                   foreign_options=True))
           for name in ("full", "lora", "dora", "adapter")}
    return out | {"dev": str(data["dev"]), "root": root}


@pytest.fixture(scope="module")
def full_onnx(runs) -> Path:
    """One ONNX export of the full run, shared by the tests that only read it."""
    return cli_export(runs["full"], "onnx", runs["root"] / "exports" / "full-onnx")


def run_logits(run, texts=TEXTS) -> np.ndarray:
    model, tok, meta = load_trained(run, device="cpu")
    with torch.inference_mode():
        enc = tok(texts, padding=True, truncation=True, max_length=meta["max_length"], return_tensors="pt")
        return model(**enc).logits.float().numpy()


def cli_export(run, fmt, out, *extra) -> Path:
    assert main(["export", str(run), "--format", fmt, "--out", str(out), *extra]) == 0
    assert not any(f.suffix in PICKLE for f in Path(out).rglob("*")), "pickle in an export folder"
    assert not list(Path(out).parent.glob(f".{Path(out).name}.*")), "temporary folder left behind"
    return Path(out)


def test_hf_export_equals_run_and_pipeline_loads_it(runs, tmp_path, capsys):
    from transformers import pipeline

    out = cli_export(runs["full"], "hf", tmp_path / "hf")
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)  # the folder is the last stdout line
    meta = json.loads((out / "sftlab_export.json").read_text())
    assert meta["format"] == "hf" and meta["labels"] == ["negative", "positive"] and meta["max_length"] == 32
    assert meta["report"]["parity"]["max_abs_logit_diff"] <= 1e-5
    np.testing.assert_allclose(load_exported(out).logits(TEXTS), run_logits(runs["full"]), atol=1e-5, rtol=0)
    clf = pipeline("text-classification", model=str(out), device="cpu")
    got = clf(TEXTS[:4], top_k=None)
    want = torch.softmax(torch.from_numpy(run_logits(runs["full"], TEXTS[:4])), -1).numpy()
    for row, p in zip(got, want):
        assert {d["label"]: d["score"] for d in row} == pytest.approx(dict(zip(["negative", "positive"], p)), abs=1e-5)


@pytest.mark.parametrize("strategy", ["lora", "dora"])
def test_merged_equals_unmerged(runs, tmp_path, strategy):
    from transformers import AutoModelForSequenceClassification

    out = cli_export(runs[strategy], "merged", tmp_path / "merged")
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = load_exported(out).tokenizer
    with torch.inference_mode():
        merged = model(**tok(TEXTS, padding=True, truncation=True, max_length=32, return_tensors="pt")).logits
    np.testing.assert_allclose(merged.numpy(), run_logits(runs[strategy]), atol=1e-5, rtol=0)
    assert model.config.id2label == {0: "negative", 1: "positive"}


def test_peft_export_loads_with_peft_on_the_base(runs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = cli_export(runs["lora"], "peft", tmp_path / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(cfg["base_model_name_or_path"], num_labels=2)
    model = PeftModel.from_pretrained(base, out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    with torch.inference_mode():
        got = model(**tok(TEXTS, padding=True, truncation=True, max_length=32, return_tensors="pt")).logits
    np.testing.assert_allclose(got.numpy(), run_logits(runs["lora"]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("strategy", ["full", "adapter"])
def test_onnx_equals_run_in_plain_onnxruntime(runs, full_onnx, tmp_path, capsys, strategy):
    import onnxruntime as ort
    from transformers import AutoTokenizer

    if strategy == "full":
        out = full_onnx
    else:
        capsys.readouterr()
        out = cli_export(runs[strategy], "onnx", tmp_path / "onnx")
        assert capsys.readouterr().out.splitlines() == [str(out)]  # the exporter's chatter went to stderr
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    enc = AutoTokenizer.from_pretrained(out)(TEXTS, padding=True, truncation=True, max_length=32, return_tensors="np")
    got = session.run(None, {i.name: enc[i.name].astype(np.int64) for i in session.get_inputs()})[0]
    np.testing.assert_allclose(got, run_logits(runs[strategy]), atol=1e-4, rtol=0)
    report = json.loads((out / "sftlab_export.json").read_text())["report"]
    assert report["parity"]["max_abs_logit_diff"] <= 1e-4 and report["examples"] == 40  # the run's own dev set
    assert report["metric_change"]["accuracy"] == 0.0 and report["argmax_agreement"] == 1.0
    assert set(report["latency_ms"]) == set(report["fp32"]["latency_ms"]) == {"batch_1", "batch_32"}


def test_int8_is_smaller_and_agrees_with_fp32(runs, tmp_path):
    out = cli_export(runs["full"], "int8", tmp_path / "int8", "--data", runs["dev"])
    report = json.loads((out / "sftlab_export.json").read_text())["report"]
    assert (out / "model.onnx").stat().st_size < 0.5 * report["fp32"]["weights_mb"] * 1e6
    ref, got = run_logits(runs["full"]), load_exported(out).logits(TEXTS)
    assert 0.2 < ref.argmax(1).mean() < 0.8 and np.ptp(ref) > 1  # a model that separates, not a constant one
    # int8 kernels differ by CPU (VNNI or not): max |diff| 0.12 on a 2-core AMD EPYC, < 0.1 on the Xeons before
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.9 and np.abs(ref - got).max() < 0.2
    assert report["argmax_agreement"] >= 0.9 and abs(report["metric_change"]["accuracy"]) <= 0.1
    assert report["data"] == runs["dev"] and report["threads"] == 1


def test_predict_on_export_equals_predict_on_run(runs, full_onnx, tmp_path, capsys):
    out = full_onnx
    a, b = tmp_path / "export.jsonl", tmp_path / "run.jsonl"
    assert main(["predict", str(out), "--data", runs["dev"], "--out", str(a)]) == 0
    assert main(["predict", str(runs["full"]), "--data", runs["dev"], "--out", str(b), "--fp32"]) == 0
    rows_a, rows_b = ([json.loads(x) for x in f.read_text().splitlines()] for f in (a, b))
    assert len(rows_a) == len(rows_b) == 40
    for x, y in zip(rows_a, rows_b):
        assert x.keys() == y.keys() and (x["line"], x["text"], x["label"]) == (y["line"], y["text"], y["label"])
        assert x["scores"] == pytest.approx(y["scores"], abs=1e-4)
    capsys.readouterr()
    assert main(["predict", str(out), "--data", runs["dev"], "--out", str(a)]) == 2  # never overwrites
    assert "exists" in capsys.readouterr().err and len(a.read_text().splitlines()) == 40


def test_regression_hf_and_predict(tiny_model_dir, tmp_path):
    rows = [{"text": r["text"], "score": float(i % 5)} for i, r in enumerate(make_rows(32))]
    data = write_jsonl(tmp_path / "reg.jsonl", rows)
    run = train(load_config(None, [
        "task=regression", f"model.name={tiny_model_dir}", f"data.train={data}", f"data.dev={data}",
        "data.label=score", "train.max_steps=4", "train.batch_size=8", "train.precision=fp32", "train.progress=false",
        "train.num_threads=1", "train.tensorboard=false", f"output_dir={tmp_path / 'run'}"]))
    out = cli_export(run, "hf", tmp_path / "hf")
    got = load_exported(out).logits(TEXTS)
    assert got.shape == (len(TEXTS), 1)
    np.testing.assert_allclose(got, run_logits(run), atol=1e-5, rtol=0)
    assert main(["predict", str(out), "--data", str(data), "--out", str(tmp_path / "p.jsonl")]) == 0
    first = json.loads((tmp_path / "p.jsonl").read_text().splitlines()[0])
    assert set(first) == {"line", "text", "prediction"} and first["prediction"] == pytest.approx(
        float(run_logits(run, [rows[0]["text"]])[0, 0]), abs=1e-5)


def test_overwrite_swaps_in_a_complete_folder(runs, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.txt").write_text("x")
    cli_export(runs["full"], "hf", out, "--overwrite")
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()


def test_failed_parity_is_loud_and_writes_nothing(runs, tmp_path, monkeypatch):
    import sftlab.export as ex

    monkeypatch.setitem(ex.TOLERANCE, "hf", -1.0)
    with pytest.raises(ExportError, match="parity check failed"):
        export(runs["full"], "hf", tmp_path / "hf", log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


def _prompt_tuning_run(root: Path) -> Path:
    """What the refusal reads (sftlab.json, adapter_config.json): no weights needed, it refuses before loading."""
    best = root / "pt" / "best"
    best.mkdir(parents=True)
    (best / "sftlab.json").write_text(json.dumps({"task": "classification", "labels": ["a", "b"], "max_length": 8,
                                                  "adapter": "peft", "strategy": "prompt_tuning", "base_path": "x"}))
    (best / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    return root / "pt"


@pytest.mark.parametrize("case,fmt,message", [
    ("full", "peft", "there is no adapter to export; use --format hf"),
    ("adapter", "hf", "use --format onnx or int8"),
    ("adapter", "merged", "use --format onnx or int8"),
    ("adapter", "peft", "use --format onnx or int8"),
    ("prompt", "merged", "use --format peft"),
    ("prompt", "onnx", "use --format peft"),
    ("full", "tflite", "choose one of hf, merged, peft, int8, onnx"),
    ("busy", "hf", "exists and is not empty"),
    ("inside", "hf", "would replace the run itself"),
])
def test_refusals_are_one_line(runs, tmp_path, capsys, case, fmt, message):
    run = {"prompt": _prompt_tuning_run(tmp_path)}.get(case) or runs["full" if case in ("busy", "inside") else case]
    out = tmp_path / "out"
    if case == "busy":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    if case == "inside":
        out = Path(run) / "best"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["export", str(run), "--format", fmt, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sftlab: error:") and message in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    if case == "busy":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_decoder_lora_merged_equals_unmerged_and_onnx_refused(tiny_llama_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_jsonl(tmp_path / "chats.jsonl", make_chats(16))
    run = train(load_config(None, [
        "task=causal_lm", f"model.name={tiny_llama_dir}", f"data.train={data}", f"data.dev={data}",
        "strategy.name=lora", "strategy.r=4", "train.max_steps=4", "train.batch_size=8", "train.lr=1e-2",
        "train.precision=fp32", "train.progress=false", "train.num_threads=1", "train.tensorboard=false",
        f"output_dir={tmp_path / 'run'}"]))
    prompts = ["Is this positive or negative? the film was great", "hello there"]
    model, tok, _ = load_trained(run, device="cpu")
    with torch.inference_mode():
        want = [model(**tok(p, return_tensors="pt")).logits for p in prompts]
    for fmt in ("merged", "peft"):
        out = cli_export(run, fmt, tmp_path / fmt)
        if fmt == "merged":
            got_model = AutoModelForCausalLM.from_pretrained(out).eval()
        else:
            got_model = load_exported(out).model
        tok2 = AutoTokenizer.from_pretrained(out)
        with torch.inference_mode():
            for p, w in zip(prompts, want):
                torch.testing.assert_close(got_model(**tok2(p, return_tensors="pt")).logits, w, atol=1e-5, rtol=0)
    assert not hasattr(load_exported(tmp_path / "merged"), "logits")  # serving tells decoders apart by this
    capsys.readouterr()
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "decoders are not exported to ONNX" in err and "--format merged" in err and "\n" not in err
    shutil.rmtree(run)
