"""The meta-learning loop as equations: inner_steps 0 is the identity; Reptile with one episode per step, outer lr 1
and k inner SGD steps == k plain SGD steps on the same batch; FOMAML's outer step is AdamW's first step on the
query gradient at the adapted weights; episodes are pure in (seed, step); resume == uninterrupted; 2 processes == 1."""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import make_rows, write_jsonl

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def meta_overrides(tiny_model_dir, tmp_path) -> list[str]:
    """Three sentiment tasks (same labels), 40 rows each, the tiny BERT, fp32, no warmup, constant schedule."""
    tasks = [f"tasks.t{i}.train={write_jsonl(tmp_path / f't{i}.jsonl', make_rows(40, seed=10 + i))}"
             for i in range(3)]
    return [f"model.name={tiny_model_dir}", "task=multitask", *tasks, "meta.k_shot=4", "meta.query=4",
            "meta.inner_steps=3", "meta.inner_lr=0.05", "meta.tasks_per_step=2", "train.max_steps=4",
            "train.warmup_steps=0", "train.schedule=constant", "train.precision=fp32", "train.progress=false",
            "train.tensorboard=false", "data.max_length=32", f"output_dir={tmp_path / 'run'}"]


def run(over: list[str], **kw):
    from sftlab.config import load_config
    from sftlab.train.loop import train

    return train(load_config(None, over), **kw)


def weights(run_dir) -> dict:
    return load_file(str(run_dir / "best" / "model.safetensors"))


def start_model(tiny_model_dir):
    from sftlab.models import load_model

    return load_model(str(tiny_model_dir), "classification", ["negative", "positive"], seed=0)


def episode_batch(over, step, n=None):
    """The support and query batches of `step`'s episodes, rebuilt with the loop's own functions."""
    from sftlab.config import load_config
    from sftlab.data.batches import collate
    from sftlab.data.prepare import prepare
    from sftlab.models import load_tokenizer
    from sftlab.train.meta_loop import episodes, task_groups, task_rows

    cfg = load_config(None, over)
    tok = load_tokenizer(cfg.model.name)
    prepared = prepare(cfg, tok, ("train",))
    data = prepared.encoded["train"]
    m = cfg.meta
    eps = episodes(task_rows(task_groups(cfg, prepared), data.labels, m.k_shot + m.query), n or m.tasks_per_step,
                   m.k_shot,
                   m.query if m.algorithm == "fomaml" else 0, cfg.train.seed, step)
    return [(collate(data, e["support"], tok.pad_token_id, False), collate(data, e["query"], tok.pad_token_id, False)
             if e["query"] else None) for e in eps]


def test_zero_inner_steps_leave_the_weights_unchanged(meta_overrides, tiny_model_dir):
    got = weights(run(meta_overrides + ["meta.inner_steps=0"]))
    want = start_model(tiny_model_dir).state_dict()
    for k, v in got.items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=0, msg=k)


def test_reptile_outer_lr_1_one_episode_is_plain_sgd(meta_overrides, tiny_model_dir):
    over = meta_overrides + ["meta.tasks_per_step=1", "meta.outer_lr=1.0", "train.max_steps=1"]
    got = weights(run(over))
    (support, _), = episode_batch(over, 0)
    model = start_model(tiny_model_dir).train()
    sgd = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):  # meta.inner_steps, on the whole support set each time
        sgd.zero_grad()
        torch.nn.functional.cross_entropy(model(**{k: v for k, v in support.items() if k != "labels"}).logits,
                                          support["labels"]).backward()
        sgd.step()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_fomaml_step_is_adamw_on_the_query_gradient_at_the_adapted_weights(meta_overrides, tiny_model_dir):
    over = meta_overrides + ["meta.algorithm=fomaml", "meta.tasks_per_step=1", "train.max_steps=1",
                             "train.lr=1e-3", "train.weight_decay=0"]
    got = weights(run(over))
    (support, query), = episode_batch(over, 0)
    theta = start_model(tiny_model_dir)
    phi = copy.deepcopy(theta).train()
    sgd = torch.optim.SGD(phi.parameters(), lr=0.05)
    for batch in (support,) * 3 + (query,):
        sgd.zero_grad()
        torch.nn.functional.cross_entropy(phi(**{k: v for k, v in batch.items() if k != "labels"}).logits,
                                          batch["labels"]).backward()
        if batch is not query:
            sgd.step()
    # AdamW's first step (bias-corrected): theta - lr * g / (|g| + eps); the gradient is the query loss's at phi
    grads = dict(phi.named_parameters())
    for k, p in theta.named_parameters():
        g = grads[k].grad
        torch.testing.assert_close(got[k], p.detach() - 1e-3 * g / (g.abs() + 1e-8), rtol=1e-4, atol=1e-6, msg=k)


def test_group_by_on_one_file_equals_the_same_rows_as_tasks(meta_overrides, tmp_path):
    """meta.group_by: a domain column of one classification file gives the tasks that tasks: entries holding the same
    rows give (same episodes, same weights)."""
    import json

    rows = []
    for i in range(3):
        rows += [r | {"domain": f"t{i}"} for r in make_rows(40, seed=10 + i)]
    one = write_jsonl(tmp_path / "all.jsonl", rows)
    grouped = [o for o in meta_overrides if not o.startswith(("tasks.", "task=", "output_dir"))] + [
        "task=classification", f"data.train={one}", "meta.group_by=domain", f"output_dir={tmp_path / 'grouped'}"]
    a, b = weights(run(meta_overrides)), weights(run(grouped))
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=0, atol=0, msg=k)
    assert json.loads((tmp_path / "grouped" / "best" / "sftlab.json").read_text())["task"] == "classification"


def test_episodes_are_pure_in_seed_and_step(meta_overrides):
    from sftlab.train.meta_loop import episodes

    tasks = [{"name": f"t{i}", "by_class": [list(range(100 * i, 100 * i + 20)), list(range(100 * i + 50,
                                                                                       100 * i + 70))]}
             for i in range(3)]
    a, b = episodes(tasks, 4, 3, 2, 0, 7), episodes(tasks, 4, 3, 2, 0, 7)
    assert a == b and a != episodes(tasks, 4, 3, 2, 0, 8) and a != episodes(tasks, 4, 3, 2, 1, 7)
    assert sorted(e["task"] for e in a[:3]) == ["t0", "t1", "t2"]  # without replacement while tasks last
    for e in a:
        assert len(e["support"]) == 6 and len(e["query"]) == 4 and not set(e["support"]) & set(e["query"])


def test_resume_equals_uninterrupted(meta_overrides, tmp_path, monkeypatch):
    import sftlab.train.meta_loop as meta

    whole = weights(run(meta_overrides + [f"output_dir={tmp_path / 'whole'}"]))
    real = meta.save_checkpoint

    def crash(run_dir, step, *a, **k):
        out = real(run_dir, step, *a, **k)
        if step == 2:
            raise KeyboardInterrupt
        return out

    over = meta_overrides + ["train.eval_every=2", f"output_dir={tmp_path / 'cut'}"]
    monkeypatch.setattr(meta, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        run(over)
    monkeypatch.setattr(meta, "save_checkpoint", real)
    resumed = weights(run(over, resume=tmp_path / "cut"))
    for k, v in whole.items():
        torch.testing.assert_close(resumed[k], v, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("algorithm", ["reptile", "fomaml"])
def test_two_processes_equal_one(meta_overrides, tmp_path, algorithm):
    from tests.unit.test_ddp import LAUNCHERS, free_port

    common = [o for o in meta_overrides if not o.startswith("output_dir")] + [f"meta.algorithm={algorithm}",
                                                                              "meta.tasks_per_step=4"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    out = {}
    for name, launcher in (("two", LAUNCHERS["torchrun"](free_port())), ("one", ["-m", "sftlab"])):
        out[name] = tmp_path / name
        proc = subprocess.run([sys.executable, *launcher, "train", "-", *common, f"output_dir={out[name]}"],
                              env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = weights(out["two"]), weights(out["one"])
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


@pytest.mark.parametrize("change, message", [
    (["drop:tasks.t1", "drop:tasks.t2"], "meta: learns across tasks: set task: multitask with two or more"),
    (["meta.k_shot=30"], "meta.k_shot (+ meta.query) needs"),
    (["meta.algorithm=fomaml", "meta.inner_steps=0"], "inner_steps must be >= 1 with fomaml"),
])
def test_bad_input_is_one_line_and_exit_2(meta_overrides, capsys, change, message):
    from sftlab.cli import main

    drop = tuple(c[5:] for c in change if c.startswith("drop:"))
    over = [o for o in meta_overrides if not (drop and o.startswith(drop))]
    code = main(["train", "-", *over, *[c for c in change if not c.startswith("drop:")]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and "Traceback" not in "\n".join(err)


def test_adapt_scores_a_meta_start_per_seed_and_prints_json_last(meta_overrides, tmp_path, capsys):
    """`sftlab adapt` from a meta-learned run: one child run per seed on K rows per class, scored on the rows of
    --data outside each sample; the last stdout line is the JSON summary of the primary metric."""
    import json

    from sftlab.cli import main

    meta_run = run(meta_overrides)
    new = write_jsonl(tmp_path / "new.jsonl", make_rows(30, seed=99))
    assert main(["adapt", str(meta_run), "--data", str(new), "--k-shot", "2", "--seeds", "0,1", "--steps", "3",
                 "--out", str(tmp_path / "adapt"), "train.precision=fp32", "data.max_length=32"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    last = json.loads(out[-1])
    assert last["metric"] == "accuracy" and len(last["per_seed"]) == 2
    assert abs(last["mean"] - sum(last["per_seed"]) / 2) < 1e-12
    for seed in (0, 1):
        summary = json.loads((tmp_path / "adapt" / f"k2-seed{seed}" / "summary.json").read_text())
        assert summary["data"]["dev"]["rows"] == 30 - 4  # the file minus its 2 x 2 sampled rows
        assert summary["dev_metrics"]["accuracy"] == last["per_seed"][seed]


def test_episodes_set_the_length_as_max_steps_does(meta_overrides, tmp_path):
    """meta.episodes=7 at 2 per step is 4 outer steps: the run of train.max_steps=4."""
    import json

    a = weights(run(meta_overrides))
    over = [o for o in meta_overrides if not o.startswith(("train.max_steps", "output_dir"))]
    b_dir = run(over + ["meta.episodes=7", f"output_dir={tmp_path / 'episodes'}"])
    b = weights(b_dir)
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=0, atol=0, msg=k)
    assert json.loads((b_dir / "summary.json").read_text())["steps"] == 4


def test_bf16_autocast_is_the_main_loops_rule(meta_overrides, tiny_model_dir):
    """train.precision=bf16: the inner steps run under bf16 autocast (as loop.py's steps do), so Reptile at outer
    lr 1 with one episode still equals plain SGD under the same autocast; fp32 weights, summary says bf16."""
    import json

    over = [o for o in meta_overrides if o != "train.precision=fp32"]
    over += ["train.precision=bf16", "meta.tasks_per_step=1", "meta.outer_lr=1.0", "train.max_steps=1"]
    run_dir = run(over)
    got = weights(run_dir)
    (support, _), = episode_batch(over, 0)
    model = start_model(tiny_model_dir).train()
    sgd = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        sgd.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(**{k: v for k, v in support.items() if k != "labels"}).logits
        torch.nn.functional.cross_entropy(logits.float(), support["labels"]).backward()
        sgd.step()
    for k, v in model.state_dict().items():
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert json.loads((run_dir / "summary.json").read_text())["precision"] == "bf16"


def three_class_rows(n: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    words = {"low": ["cold", "small", "quiet"], "mid": ["plain", "usual", "fair"], "high": ["hot", "huge", "loud"]}
    return [{"text": f"the room was {rng.choice(words[y])} today", "label": y}
            for i in range(n) for y in [("low", "mid", "high")[i % 3]]]


def test_prototype_head_scores_classes_by_distance_to_their_support_mean(tiny_model_dir):
    """Proto-MAML's head: logits == -|f - mu_c|^2 + |f|^2 for the features f the head's Linear reads, so softmax
    over classes is the prototype network's; zeros gives uniform logits."""
    from torch.func import functional_call

    from sftlab.models import load_tokenizer
    from sftlab.train.meta_loop import episode_head, head_linear

    model = start_model(tiny_model_dir).train()
    tok = load_tokenizer(str(tiny_model_dir))
    rows = three_class_rows(9, seed=0)
    support = dict(tok([r["text"] for r in rows], padding=True, return_tensors="pt"))
    support["labels"] = torch.tensor([("low", "mid", "high").index(r["label"]) for r in rows])
    theta = {n: p.detach() for n, p in model.named_parameters()}
    head = head_linear(model)
    zeros = episode_head(model, theta, head, support, 3, "zeros", False)
    assert all(v.shape[0] == 3 and not v.any() for v in zeros.values())
    proto = episode_head(model, theta, head, support, 3, "prototypes", False)
    assert model.training  # back in train mode after the feature pass
    feats = []
    linear = model.get_submodule(head[0].rsplit(".", 1)[0])
    hook = linear.register_forward_hook(lambda m, a, r: feats.append(a[0]))
    model.eval()
    with torch.no_grad():
        logits = functional_call(model, {**theta, **proto}, args=(),
                                 kwargs={k: v for k, v in support.items() if k != "labels"}).logits
    hook.remove()
    f = feats[0]
    mu = torch.stack([f[support["labels"] == c].mean(0) for c in range(3)])
    want = -((f[:, None] - mu[None]) ** 2).sum(-1) + (f * f).sum(-1, keepdim=True)
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("init", ["zeros", "prototypes"])
def test_tasks_with_different_label_sets_get_a_fresh_head_per_episode(meta_overrides, tmp_path, init):
    """A 2-class and a 3-class task: the head is built per episode and never meta-updated (the saved head is the
    start's); with zeros, the first support loss is exactly the mean of ln(classes) over the step's episodes."""
    import json
    import math

    from sftlab.train.meta_loop import head_linear

    three = write_jsonl(tmp_path / "three.jsonl", three_class_rows(30, seed=3))
    over = [o for o in meta_overrides if not o.startswith(("tasks.t2", "output_dir", "train.max_steps"))]
    over += [f"tasks.t2.train={three}", f"meta.head_init={init}", "train.max_steps=2", "train.log_every=1",
             f"output_dir={tmp_path / init}"]
    run_dir = run(over)
    got, start = weights(run_dir), start_model(meta_overrides[0].split("=", 1)[1]).state_dict()
    for n in head_linear(start_model(meta_overrides[0].split("=", 1)[1])):
        torch.testing.assert_close(got[n], start[n], rtol=0, atol=0)
    assert not json.loads((run_dir / "summary.json").read_text())["meta_learned_head"]
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    eps = episode_batch(over, 0)
    if init == "zeros":
        want = sum(math.log(len(set(s["labels"].tolist()))) for s, _ in eps) / len(eps)
        assert first["loss"] == pytest.approx(want, rel=1e-5)
    assert math.isfinite(first["loss/adapted"])
