"""`task: multitask`: one shared encoder, one head per task, each step drawn from one task (MT-DNN, Liu et al. 2019,
"Multi-Task Deep Neural Networks for Natural Language Understanding"; the samplers of Stickland & Murray 2019).

    task: multitask
    tasks:
      sst2: {task: classification, train: glue/sst2/train.tsv, dev: glue/sst2/dev.tsv, text: sentence}
      stsb: {task: regression, train: glue/stsb/train.tsv, text: sentence1, text_pair: sentence2, label: score}
    mixture: {sampler: temperature, temperature: 2.0}

Every task's rows live in one row space (task k's rows follow task k-1's), so the loop's batching, collate, units
and resume work unchanged: a step is one task's step batch. Which task a step draws is `data/mixture.py`'s pure
function of (seed, step), and each task's stream keeps its own epochs, so the plan of any epoch is a pure function
of (seed, epoch): resume and DDP stay exact and a one-task mixture is the single-task run, bit for bit (tested).
The heads sit behind one switch in place of the model's own head (models/multihead.py), so strategies, the
first-token last block and PEFT see an ordinary sequence classifier. Dev: every task's metrics as `NAME/metric`
and `mean`, the mean of each task's primary metric (GLUE's average), the default model-selection metric.
Pitfall (MT-DNN section 3): the tasks' losses are on different scales (MSE vs cross-entropy); `weight` per task.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..data.batches import Encoded
from ..registry import tasks
from . import TaskSpec


@dataclass(frozen=True)
class Head:
    """One task's head: its name, kind (classification | regression), class names, loss weight, primary metric."""
    name: str
    kind: str
    labels: list[str] | None
    weight: float = 1.0
    metric: str | None = None

    def to_json(self) -> dict:
        return {"name": self.name, "task": self.kind, "labels": self.labels, "weight": self.weight,
                "metric": self.metric}

    @classmethod
    def from_json(cls, d: dict) -> "Head":
        return cls(d["name"], d["task"], d.get("labels"), d.get("weight", 1.0), d.get("metric"))


@dataclass
class MultiEncoded(Encoded):
    """Every task's rows in one row space: task k's rows are offsets[k] .. offsets[k + 1] - 1."""
    heads: list[Head] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)

    def task_of(self, row: int) -> int:
        return int(np.searchsorted(self.offsets, row, side="right")) - 1


@dataclass
class MultiDev:
    """Every task's dev rows, evaluated head by head."""
    heads: list[Head]
    parts: list[Encoded | None]

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts if p is not None)

    @property
    def lengths(self) -> list[int]:
        return [n for p in self.parts if p is not None for n in p.lengths]


def join_tasks(heads: list[Head], parts: list[Encoded]) -> MultiEncoded:
    offsets = list(np.cumsum([0] + [len(p) for p in parts]))
    ids = [x for p in parts for x in p.input_ids]
    types = None
    if any(p.token_type_ids is not None for p in parts):
        types = [t for p in parts for t in (p.token_type_ids or [[0] * len(x) for x in p.input_ids])]
    raw = [n for p in parts for n in (p.raw_lengths or p.lengths)]
    return MultiEncoded(ids, types, [y for p in parts for y in p.labels], sum(p.truncated for p in parts), raw,
                        sum(p.capped for p in parts), heads=heads, offsets=[int(o) for o in offsets])


def primary(head: Head) -> str:
    return head.metric or task_spec_of(head).default_metric


def task_spec_of(head: Head) -> TaskSpec:
    from . import task_spec

    return task_spec(head.kind)


def collate(data: MultiEncoded, rows, pad_id, multiple=1, epoch=0) -> dict:
    """The step's task from its rows (a step is one task's); its head index and loss weight travel in the batch."""
    from ..data.batches import collate as pad

    k = data.task_of(rows[0])
    head = data.heads[k]
    batch = pad(data, rows, pad_id, head.kind == "regression", multiple)
    batch["task_index"] = torch.tensor(k)
    if head.weight != 1.0:
        batch["loss_weight"] = torch.tensor(head.weight)
    return batch


def loss(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    from ..models.multihead import active_head
    from .sequence import classification_loss, regression_loss

    batch = dict(batch)
    k, w = int(batch.pop("task_index")), batch.pop("loss_weight", None)
    with active_head(model, k):
        out, logits = (regression_loss if batch["labels"].is_floating_point() else classification_loss)(model, batch)
    return (out * w if w is not None else out), logits


def evaluate(model, data: MultiDev, **kw) -> dict:
    """Each head on its task's dev rows: NAME/metric for all, `mean` of the primaries, `loss` their mean loss."""
    from ..models.multihead import active_head

    scores, prim, losses = {}, [], []
    for k, (head, part) in enumerate(zip(data.heads, data.parts)):
        if part is None:
            continue
        with active_head(model, k):
            s = task_spec_of(head).evaluate(model, part, **kw)
        scores |= {f"{head.name}/{m}": v for m, v in s.items()}
        prim.append(s[primary(head)])
        losses.append(s["loss"])
    return {"mean": float(np.mean(prim)), **scores, "loss": float(np.mean(losses))}


def prepare_multitask(cfg, tokenizer, splits=("train", "dev", "test")):
    """Each task read as a single-task run reads `data` (its columns, the shared max_length, dir, skip_invalid),
    then joined: train rows in one row space, dev and test per head. The report has a row per task and split, and
    the sampler's expected share of steps per task."""
    from ..data.mixture import Mixture
    from ..data.prepare import Prepared, prepare

    keys = ("train", "dev", "test", "text", "text_pair", "label", "labels", "header", "limit_train", "limit_dev")
    heads, subs = [], []
    for name, entry in cfg.tasks.items():
        d = cfg.data.model_copy(update={k: getattr(entry, k) for k in keys})
        sub = prepare(cfg.model_copy(update={"task": entry.task, "data": d, "tasks": None, "mixture": None}),
                      tokenizer, splits)
        heads.append(Head(name, entry.task, sub.labels.names if sub.labels else None, entry.weight, entry.metric))
        subs.append(sub)
    out = Prepared(labels=None)
    if "train" in splits:
        out.encoded["train"] = join_tasks(heads, [s.encoded["train"] for s in subs])
    for split in ("dev", "test"):
        if split in splits and any(split in s.encoded for s in subs):
            out.encoded[split] = MultiDev(heads, [s.encoded.get(split) for s in subs])
    for h, sub in zip(heads, subs):
        out.lm_report |= {f"{h.name}/{k}": v for k, v in sub.report(h.kind).items()}
    if "train" in splits:
        mix = cfg.mixture
        m = Mixture([s.encoded["train"].lengths for s in subs], out.encoded["train"].offsets,
                    cfg.train.batch_size * cfg.train.grad_accum, cfg.train.seed, False,
                    mix.sampler if mix else "proportional", mix.temperature if mix else None)
        p = [float(x) for x in np.bincount([m.task_at(i) for i in range(10_000)], minlength=len(heads)) / 10_000]
        out.lm_report["mixture"] = {"sampler": mix.sampler if mix else "proportional",
                                    "share": {h.name: round(x, 4) for h, x in zip(heads, p)}}
    return out


def head_kwargs(heads: list[Head]) -> dict:
    """The model loads with the first task's head (so a one-task mixture inits it as the single-task run does);
    models/multihead.py then puts every task's head behind a switch in its place."""
    return task_spec_of(heads[0]).head_kwargs(heads[0].labels)


def after_load(model, folder, missing, train_data, labels=None) -> None:
    from ..models.multihead import install_heads

    install_heads(model, labels, folder)


def _ones(data) -> list:
    return [1] * len(data)


tasks.register("multitask")(TaskSpec(
    "multitask", decoder=False, head_kwargs=head_kwargs, loss=loss, collate=collate, units=_ones, examples=_ones,
    evaluate=evaluate, metrics={"mean": True, "loss": False}, after_load=after_load))
