"""task: multitask as equations: a one-task mixture is the single-task run bit for bit, the samplers' exact counts,
each head's dev metric equals that head evaluated alone, resume equals uninterrupted, and the bad inputs."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import crash_after_checkpoint, make_rows, write_jsonl

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def tasks(tmp_path, toy_data):
    """Three small tasks: the toy sentiment task, a 3-class one and a regression one (score = positivity)."""
    rng = random.Random(3)
    three = [{"text": r["text"], "label": ["a", "b", "c"][i % 3]} for i, r in enumerate(make_rows(30, seed=7))]
    reg = [{"text": r["text"], "score": float(r["label"] == "positive") * 4 + rng.random()}
           for r in make_rows(40, seed=8)]
    files = {"three": write_jsonl(tmp_path / "three.jsonl", three), "reg": write_jsonl(tmp_path / "reg.jsonl", reg)}
    return {"sent": {"task": "classification", "train": toy_data["train"], "dev": toy_data["dev"]},
            "three": {"task": "classification", "train": str(files["three"]), "dev": str(files["three"])},
            "reg": {"task": "regression", "train": str(files["reg"]), "dev": str(files["reg"]), "label": "score"}}


def _multi(tiny_overrides, tasks: dict, *extra) -> list[str]:
    base = [o for o in tiny_overrides if not o.startswith(("data.train=", "data.dev="))]
    return base + ["task=multitask", f"tasks={json.dumps(tasks)}", *extra]


def _train(overrides):
    import sftlab.train.loop as loop
    from sftlab.config import load_config

    return loop.train(load_config(None, overrides))


def test_one_task_mixture_is_the_single_task_run_bit_for_bit(tiny_overrides, tasks, tmp_path):
    single = _train(tiny_overrides)
    multi = _train(_multi(tiny_overrides, {"sent": tasks["sent"]}, f"output_dir={tmp_path / 'multi'}"))
    a, b = load_file(str(single / "best" / "model.safetensors")), load_file(str(multi / "best" / "model.safetensors"))
    b = {k.replace("classifier.heads.sent.", "classifier."): v for k, v in b.items()}
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (single, multi))
    assert s1["dev_metrics"]["accuracy"] == s2["dev_metrics"]["sent/accuracy"] == s2["dev_metrics"]["mean"]


def test_samplers_exact_counts():
    from sftlab.data.mixture import probabilities, task_at

    sizes, n = [1000, 100, 10], 10_000
    draws = {s: [task_at(i, 0, sizes, s, None, n) for i in range(n)] for s in ("proportional", "round_robin")}
    assert draws["round_robin"] == [i % 3 for i in range(n)]
    t1 = [task_at(i, 0, sizes, "temperature", 1.0, n) for i in range(n)]
    assert t1 == draws["proportional"]  # T = 1 is proportional, draw for draw
    counts = np.bincount(draws["proportional"], minlength=3) / n
    np.testing.assert_allclose(counts, np.array(sizes) / sum(sizes), atol=0.01)
    hot = np.bincount([task_at(i, 0, sizes, "temperature", 1e6, n) for i in range(n)], minlength=3) / n
    np.testing.assert_allclose(hot, [1 / 3] * 3, atol=0.015)  # large T -> uniform
    p = probabilities(sizes, "temperature", 2.0, 0, n)
    np.testing.assert_allclose(p, np.sqrt(sizes) / np.sqrt(sizes).sum())
    a0, a1 = probabilities(sizes, "annealed", None, 0, n), probabilities(sizes, "annealed", None, n - 1, n)
    np.testing.assert_allclose(a0, np.array(sizes) / sum(sizes))
    np.testing.assert_allclose(a1, np.array(sizes) ** 0.2 / (np.array(sizes) ** 0.2).sum())


def test_mixture_plan_streams_keep_their_own_epochs():
    """Every task's rows come in its own step_batches order, epoch after epoch, whatever the interleaving."""
    from sftlab.data.batches import step_batches
    from sftlab.data.mixture import Mixture

    lengths = [[5] * 20, [7] * 6]
    m = Mixture(lengths, [0, 20, 26], 4, seed=1, group_by_length=False, sampler="round_robin")
    seen = {0: [], 1: []}
    for e in range(3):
        for b in m.epoch(e):
            k = 0 if b[0] < 20 else 1
            seen[k].append([i - (0, 20)[k] for i in b])
    for k, n in ((0, 5), (1, 2)):  # batches per pass
        expect = [b for e in range(10) for b in step_batches(lengths[k], 4, 1, e, False)]
        assert seen[k] == expect[:len(seen[k])]


def test_each_head_dev_metric_equals_that_head_alone_and_logs_per_task(tiny_overrides, tasks, tmp_path):
    from sftlab.data.batches import encode
    from sftlab.data.examples import load_split
    from sftlab.config import load_config
    from sftlab.models import load_model, load_tokenizer
    from sftlab.models.multihead import active_head
    from sftlab.tasks import task_spec
    from sftlab.tasks.multitask import Head

    run = _train(_multi(tiny_overrides, tasks, "mixture={sampler: temperature, temperature: 2.0}"))
    summary = json.loads((run / "summary.json").read_text())["dev_metrics"]
    assert {"sent/accuracy", "three/accuracy", "reg/pearson", "mean"} <= set(summary)
    assert summary["mean"] == pytest.approx(np.mean([summary["sent/accuracy"], summary["three/accuracy"],
                                                     summary["reg/pearson"]]))
    meta = json.loads((run / "best" / "sftlab.json").read_text())
    heads = [Head.from_json(h) for h in meta["labels"]]
    assert [h.name for h in heads] == ["sent", "three", "reg"] and heads[1].labels == ["a", "b", "c"]
    model = load_model(str(run / "best"), "multitask", heads)
    cfg = load_config(None, _multi(tiny_overrides, tasks))
    tok = load_tokenizer(str(run / "best"))
    for k, h in enumerate(heads):
        d = cfg.data.model_copy(update={k2: v for k2, v in tasks[h.name].items() if k2 != "task"})
        split, _ = load_split(d, tasks[h.name]["dev"], h.kind, None if h.kind == "regression" else
                              __import__("sftlab.data.examples", fromlist=["LabelMap"]).LabelMap(h.labels))
        with active_head(model, k):
            alone = task_spec(h.kind).evaluate(model, encode(tok, split.examples, cfg.data.max_length), batch_size=16,
                                              pad_id=tok.pad_token_id, device=torch.device("cpu"), bf16=False)
        for metric in ("mse",) if h.kind == "regression" else ("accuracy", "loss"):  # (a near-constant tiny head's
            assert alone[metric] == pytest.approx(summary[f"{h.name}/{metric}"], rel=1e-5)  # Pearson is all noise)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    dev_rows = [r for r in rows if r.get("split") == "dev"]
    assert dev_rows and all("three/accuracy" in r for r in dev_rows)
    train_rows = [r for r in rows if "loss" in r and "split" not in r]  # each task's own mean training loss
    assert any({"loss/sent", "loss/three", "loss/reg"} <= set(r) for r in train_rows)
    assert not any(k.startswith("loss/units") or k.startswith("units") for r in train_rows for k in r)


def test_resume_mid_run_equals_uninterrupted(tiny_overrides, tasks, tmp_path, monkeypatch):
    import sftlab.train.loop as loop

    over = _multi(tiny_overrides, tasks, "train.eval_every=5")
    full = _train(over + [f"output_dir={tmp_path / 'full'}"])
    real = crash_after_checkpoint(monkeypatch, step=10)
    broken = over + [f"output_dir={tmp_path / 'cut'}"]
    with pytest.raises(KeyboardInterrupt):
        _train(broken)
    monkeypatch.setattr(loop, "save_checkpoint", real)
    from sftlab.config import load_config

    cut = loop.train(load_config(None, broken), resume=tmp_path / "cut")
    a, b = (load_file(str(d / "best" / "model.safetensors")) for d in (full, cut))
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("extra,needle", [
    (["task=multitask"], "needs a tasks section"),
    (["task=multitask", 'tasks={"a": {"task": "classification"}}'], "tasks.a.train"),
    (["tasks={\"a\": {\"train\": \"x.jsonl\"}}"], "are for task: multitask"),
    (["task=multitask", 'tasks={"a": {"train": "x.jsonl"}}', "mixture={sampler: round_robin, temperature: 2}"],
     "temperature is an option of sampler temperature"),
    (["task=multitask", 'tasks={"a": {"train": "x.jsonl", "metric": "pearson"}}'], "does not fit task"),
    (["task=multitask", 'tasks={"a": {"train": "x.jsonl"}}', "train.metric=b/accuracy"], "NAME/metric"),
])
def test_bad_config_one_line(tiny_overrides, extra, needle):
    from sftlab.config import load_config
    from sftlab.errors import ConfigError

    base = [o for o in tiny_overrides if not o.startswith(("data.train=", "data.dev="))]
    with pytest.raises(ConfigError) as e:
        load_config(None, base + extra)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_two_tasks_with_one_name_in_a_config_file(tmp_path):
    from sftlab.config import load_config
    from sftlab.errors import ConfigError

    f = tmp_path / "mt.yaml"
    f.write_text("task: multitask\ntasks:\n  a: {train: x.jsonl}\n  a: {train: y.jsonl}\n")
    with pytest.raises(ConfigError, match="line 4: key 'a' appears twice"):
        load_config(str(f), [])


def test_regression_task_with_class_names_is_a_data_error(tiny_overrides, tmp_path, toy_data):
    from sftlab.errors import DataError

    with pytest.raises(DataError, match="not a number"):
        _train(_multi(tiny_overrides, {"r": {"task": "regression", "train": toy_data["train"]}}))


def test_eval_and_predict_one_task_of_a_multitask_run(tiny_overrides, tasks, capsys):
    """`sftlab eval RUN --task NAME` equals the dev figures training logged for that head; predict answers with
    that task's labels; a missing or unknown --task is one line naming the tasks."""
    from sftlab.cli import main

    run = _train(_multi(tiny_overrides, tasks))
    summary = json.loads((run / "summary.json").read_text())["dev_metrics"]
    capsys.readouterr()
    assert main(["eval", str(run), "--task", "three", "--data", tasks["three"]["dev"], "--fp32"]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["accuracy"] == pytest.approx(summary["three/accuracy"]) and scores["examples"] == 30
    assert scores["loss"] == pytest.approx(summary["three/loss"], rel=1e-5)
    assert main(["eval", str(run), "--task", "reg", "--data", tasks["reg"]["dev"], "--fp32"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mse"] == pytest.approx(summary["reg/mse"],
                                                                                                rel=1e-5)
    assert main(["predict", str(run), "--task", "three", "--data", tasks["three"]["dev"]]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 30 and set(rows[0]["scores"]) == {"a", "b", "c"}
    for argv, needle in ((["eval", str(run), "--data", tasks["three"]["dev"]], "is a multitask model"),
                         (["predict", str(run), "--task", "nope", "--data", tasks["three"]["dev"]], "has no task")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0] and "sent, three, reg" in err[0], err


def test_fine_tune_after_multitask_from_one_head(tiny_overrides, tasks, tmp_path, capsys):
    """model.name: RUN/best + model.head_from: the encoder and that head carry over exactly; wrong heads are one
    line each, before anything is written."""
    from sftlab.cli import main
    from sftlab.models import load_model

    run = _train(_multi(tiny_overrides, tasks))
    saved = load_file(str(run / "best" / "model.safetensors"))
    model = load_model(str(run / "best"), "classification", ["a", "b", "c"], head_from="three")
    for k, v in model.state_dict().items():
        src = k.replace("classifier.", "classifier.heads.three.") if k.startswith("classifier.") else k
        if src in saved:
            assert torch.equal(v, saved[src]), k
    assert torch.equal(model.classifier.weight, saved["classifier.heads.three.weight"])
    over = [o for o in tiny_overrides if not o.startswith(("data.train=", "data.dev=", "model.name=", "output_dir="))]
    three = [f"data.train={tasks['three']['train']}", f"data.dev={tasks['three']['dev']}", "train.epochs=1",
             f"model.name={run / 'best'}"]
    done = _train(over + three + ["model.head_from=three", f"output_dir={tmp_path / 'ft'}"])
    assert (done / "best" / "model.safetensors").is_file()
    capsys.readouterr()
    for extra, needle in ((["model.head_from=nope"], "has no head 'nope'; its heads: sent, three, reg"),
                          (["model.head_from=reg"], "is a regression head"),
                          (["model.head_from=sent"], "labels ['negative', 'positive']")):
        out = tmp_path / f"bad-{extra[0][-4:]}"
        assert main(["train", "-", *over, *three, *extra, f"output_dir={out}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()  # (the labels' check follows the data report)
        assert err[-1].startswith("sftlab: error: ") and needle in err[-1], err
        assert "Traceback" not in "\n".join(err)


def test_lora_multitask_saves_one_adapter_and_every_head(tiny_overrides, tasks, capsys):
    from sftlab.cli import main

    run = _train(_multi(tiny_overrides, tasks, "strategy.name=lora", "strategy.r=4", "strategy.target_modules=all-linear"))
    files = sorted(p.name for p in (run / "best").iterdir())
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    keys = load_file(str(run / "best" / "adapter_model.safetensors")).keys()
    assert {k for k in keys if "heads." in k} and all(any(f"heads.{n}." in k for k in keys) for n in tasks)
    summary = json.loads((run / "summary.json").read_text())["dev_metrics"]
    capsys.readouterr()
    assert main(["eval", str(run), "--task", "three", "--data", tasks["three"]["dev"], "--fp32"]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["loss"] == pytest.approx(summary["three/loss"], rel=1e-5)


def test_served_multitask_equals_in_memory_heads_and_refuses_unknown_tasks(tiny_overrides, tasks):
    """POST /v1/classify {"task": NAME} == each head's in-memory logits (1e-5); requests of several tasks in one
    micro-batch each get their own head; an unknown or missing task is a JSON 4xx naming the tasks."""
    from starlette.testclient import TestClient

    from sftlab.eval.evaluate import load_trained
    from sftlab.models.multihead import active_head
    from sftlab.serve.app import create_app
    from sftlab.serve.settings import ServeSettings

    run = _train(_multi(tiny_overrides, tasks))
    model, tok, meta = load_trained(run, device=torch.device("cpu"))
    texts = {name: [json.loads(x)["text"] for x in open(spec["dev"])][:6] for name, spec in tasks.items()}
    with TestClient(create_app(run, ServeSettings(precision="fp32", max_wait_ms=50))) as c:
        listed = c.get("/v1/tasks").json()["tasks"]
        assert [t["name"] for t in listed] == ["sent", "three", "reg"] and listed[1]["labels"] == ["a", "b", "c"]

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(3) as ex:  # three tasks in flight together: batched, then grouped by task
            answers = dict(zip(tasks, ex.map(lambda n: c.post("/v1/classify", json={
                "task": n, "texts": texts[n], "all_scores": True}).json(), tasks)))
        for k, name in enumerate(tasks):
            enc = tok(texts[name], padding=True, return_tensors="pt")
            with torch.no_grad(), active_head(model, k):
                logits = model(**enc).logits.float()
            preds = answers[name]["predictions"]
            if name == "reg":
                np.testing.assert_allclose([p["score"] for p in preds], logits[:, 0].numpy(), atol=1e-5)
            else:
                probs = torch.softmax(logits, -1).numpy()
                np.testing.assert_allclose([list(p["scores"].values()) for p in preds], probs, atol=1e-5)
        for body, status in (({"task": "nope", "texts": ["x"]}, 404), ({"texts": ["x"]}, 422)):
            r = c.post("/v1/classify", json=body)
            assert r.status_code == status and "sent, three, reg" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("fmt", ["hf", "onnx"])
def test_export_keeps_every_head_with_parity_per_head_and_serves(tiny_overrides, tasks, tmp_path, fmt, capsys):
    """One export folder: the encoder once and every head; each head's exported logits == in-memory logits
    (hf 1e-5, onnx 1e-4) and the server on the export answers per task as the run does."""
    pytest.importorskip("onnxruntime") if fmt == "onnx" else None
    from starlette.testclient import TestClient

    from sftlab.eval.evaluate import load_trained
    from sftlab.export import export
    from sftlab.export.runtime import load_exported
    from sftlab.models.multihead import active_head
    from sftlab.serve.app import create_app
    from sftlab.serve.settings import ServeSettings

    run = _train(_multi(tiny_overrides, tasks))
    report = export(run, fmt, tmp_path / fmt, log=lambda m: None)
    assert set(report["parity"]["per_head"]) == {"sent", "three", "reg"}
    assert report["parity"]["max_abs_logit_diff"] <= (1e-5 if fmt == "hf" else 1e-4)
    model, tok, _ = load_trained(run, device=torch.device("cpu"))
    exported = load_exported(tmp_path / fmt)
    texts = [json.loads(x)["text"] for x in open(tasks["three"]["dev"])][:5]
    for k, name in enumerate(tasks):
        with torch.no_grad(), active_head(model, k):
            ref = model(**tok(texts, padding=True, return_tensors="pt")).logits.float().numpy()
        np.testing.assert_allclose(exported.logits(texts, task=name), ref, atol=1e-4)
    from sftlab.cli import main

    summary = json.loads((run / "summary.json").read_text())["dev_metrics"]
    assert main(["eval", str(tmp_path / fmt), "--task", "three", "--data", tasks["three"]["dev"]]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"] == summary["three/accuracy"]
    assert main(["predict", str(tmp_path / fmt), "--task", "reg", "--data", tasks["reg"]["dev"]]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 40
    with TestClient(create_app(tmp_path / fmt, ServeSettings(precision="fp32"))) as c:
        assert [t["name"] for t in c.get("/v1/tasks").json()["tasks"]] == ["sent", "three", "reg"]
        got = c.post("/v1/classify", json={"task": "reg", "texts": texts}).json()["predictions"]
        with torch.no_grad(), active_head(model, 2):
            ref = model(**tok(texts, padding=True, return_tensors="pt")).logits[:, 0].numpy()
        np.testing.assert_allclose([p["score"] for p in got], ref, atol=1e-4)


def test_heads_install_whatever_the_process_seed(tiny_model_dir):
    """An unseeded process (eval, serve) may hold any 64-bit initial seed: the heads still build."""
    from sftlab.models.multihead import install_heads, switches
    from sftlab.models import load_model
    from sftlab.tasks.multitask import Head

    heads = [Head("a", "classification", ["x", "y"]), Head("b", "regression", None)]
    model = load_model(str(tiny_model_dir), "classification", ["x", "y"])
    torch.manual_seed(2**64 - 1)
    install_heads(model, heads)
    assert switches(model)[0].heads["b"].weight.shape[0] == 1
