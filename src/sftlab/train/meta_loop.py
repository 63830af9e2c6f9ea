"""The meta-learning loop, the twin of loop.py: Reptile or first-order MAML across the tasks of a multitask config.

Reptile (Nichol, Achiam & Schulman 2018, arXiv:1803.02999) moves the weights towards the mean of the weights each
episode reached after `inner_steps` SGD steps on its support set; first-order MAML (Finn, Abbeel & Levine 2017,
arXiv:1703.03400, section 5.2) feeds the query-set gradient at those adapted weights to AdamW. Both are written as
one outer optimizer step on a pseudo-gradient, theta - mean(phi) (Reptile: plain SGD at meta.outer_lr, so outer
lr 1 lands on phi; the schedule anneals it as the paper does) or mean(grad_query(phi)) (FOMAML), so checkpoints,
resume and logging are loop.py's own functions. The inner loop runs on a dict of tensors through
torch.func.functional_call: no copy of the module per episode, and the module itself is only written by the outer
step. Pitfalls, each pinned by tests/unit/test_meta.py: an episode must be a pure function of (seed, outer step) for
resume and 2 processes to be exact, dropout included (seeded per episode); with label sets that differ between
tasks the head cannot be meta-learned: each episode builds its own and the outer step leaves it alone. By default
that head is Proto-MAML's (Triantafillou et al. 2020, arXiv:1903.03096, section 3.3: the class means of the support
set's features as the weights, first-order: the means are constants); LEOPARD (Bansal et al. 2020) meta-learns a
head generator instead, not built.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list
from torch.func import functional_call
from tqdm.auto import tqdm

from .. import timing
from ..config import RunConfig
from ..data.batches import collate
from ..data.prepare import format_report, prepare
from ..errors import ConfigError, DataError
from ..models import load_model, load_tokenizer
from ..models.load import check_model
from ..models.pooling import unused_parameters
from ..precision import describe as describe_precision, resolve as resolve_precision
from ..strategies.anatomy import anatomy
from .checkpoint import complete_checkpoints, load_checkpoint, save_checkpoint
from .guards import StopSignals, trim_log
from .optim import build_optimizer, build_schedule
from .rundir import open_run_dir, save_best
from .tracking import Tracker


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train_meta(cfg: RunConfig, *, resume=None, overwrite=False, on_eval=None, graceful_stop=False,
               force_resume=False) -> Path:
    """Meta-train as configured (`meta:` section); returns the run directory, its best/ the final weights as a
    classifier of the tasks' labels: the start `sftlab adapt` and `model.name` take."""
    m, t = cfg.meta, cfg.train
    if m.episodes:  # the length in episodes: as many outer steps as hold them
        t = t.model_copy(update={"max_steps": -(-m.episodes // m.tasks_per_step)})
    if not t.max_steps:
        raise ConfigError("meta: counts outer steps: set train.max_steps (e.g. 300) or meta.episodes")
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    AcceleratorState._reset_state(reset_partial_state=False)
    acc = Accelerator(cpu=not torch.cuda.is_available())  # the process group; no DDP wrapper (updates by hand)
    main, world, rank = acc.is_main_process, acc.num_processes, acc.process_index
    # The main loop's precision rule (train.precision; auto = bf16 autocast where measured faster); the inner
    # updates and the pseudo-gradient stay fp32, only the forward/backward matmuls run in bf16.
    bf16 = resolve_precision(t.precision, acc.device)
    if t.precision == "auto" and world > 1:  # every rank takes rank 0's measurement
        bf16 = bool(broadcast_object_list([bf16])[0])
    check_model(cfg.model.name, max_length=cfg.data.max_length, trust_remote_code=cfg.model.trust_remote_code)
    with StopSignals(graceful_stop) as signals:
        run_dir = open_run_dir(cfg, resume, overwrite, main, acc.wait_for_everyone, force_resume)
        acc.wait_for_everyone()
        tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
        data = prepare(cfg, tokenizer, ("train",))
        if main:
            log(format_report(data.report(cfg.task)))
            if t.precision == "auto":
                log(describe_precision(bf16, t.precision))
        train_data = data.encoded["train"]
        groups = task_groups(cfg, data)
        tasks = task_rows(groups, train_data.labels, m.k_shot + (m.query if m.algorithm == "fomaml" else 0))
        label_sets = [labels for _, _, labels in groups]
        shared = all(ls == label_sets[0] for ls in label_sets)
        model = load_model(cfg.model.name, "classification", label_sets[0], seed=t.seed,
                           trust_remote_code=cfg.model.trust_remote_code, pooling=cfg.model.pooling)
        model.to(acc.device).train()
        for p in unused_parameters(model):  # BERT's pooler under model.pooling: mean
            p.requires_grad_(False)
        head = [] if shared else head_linear(model)  # reset per episode, never meta-updated
        names = [n for n, p in model.named_parameters() if p.requires_grad and n not in head]
        outer_lr = m.outer_lr or (1.0 if m.algorithm == "reptile" else t.lr)
        params = [dict(model.named_parameters())[n] for n in names]
        optimizer = (torch.optim.SGD(params, lr=outer_lr) if m.algorithm == "reptile" else
                     build_optimizer(model, t.model_copy(update={"lr": outer_lr})))
        scheduler = build_schedule(optimizer, t, t.max_steps)
        step, state = 0, {"train_seconds": 0.0, "episodes": 0}
        ckpts = complete_checkpoints(run_dir) if resume else []
        if ckpts:
            state = load_checkpoint(ckpts[-1], model, optimizer, scheduler)
            step = state.pop("step")
            if main:
                log(f"resumed from {ckpts[-1]} at outer step {step}/{t.max_steps}")
        if main and resume:
            trim_log(run_dir / "metrics.jsonl", step)
        metrics = open(run_dir / "metrics.jsonl", "a") if main else None
        tracker = Tracker(run_dir, cfg, resume_step=step if ckpts else None, enabled=main)  # tensorboard, mlflow
        bar = tqdm(total=t.max_steps, initial=step, desc=f"meta ({m.algorithm})", unit="step", file=sys.stderr,
                   disable=not (main and t.progress), dynamic_ncols=True)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        while step < t.max_steps:
            tick = time.perf_counter()
            theta = {n: p.detach() for n, p in model.named_parameters()}
            pseudo = {n: torch.zeros_like(theta[n]) for n in names}
            losses = torch.zeros(3, device=acc.device)  # support loss before, after adaptation; query loss
            batch = episodes(tasks, m.tasks_per_step, m.k_shot, m.query if m.algorithm == "fomaml" else 0,
                             t.seed, step)
            for ep in batch[rank::world]:
                torch.manual_seed(ep["seed"])  # dropout: a function of the episode too
                support = to(collate(train_data, ep["support"], pad_id, False), acc.device)
                start = dict(theta)
                if head:  # a new task's head, sized to its own number of classes
                    start.update(episode_head(model, theta, head, support, ep["classes"], m.head_init, bf16))
                phi, before, after = adapt(model, start, support, m.inner_steps, m.inner_lr, bf16)
                losses[0] += before
                losses[1] += after
                if m.algorithm == "reptile":
                    for n in names:
                        pseudo[n] += theta[n] - phi[n]
                else:
                    query = to(collate(train_data, ep["query"], pad_id, False), acc.device)
                    loss, grads = loss_and_grads(model, phi, query, names, bf16)
                    losses[2] += loss
                    for n, g in zip(names, grads):
                        pseudo[n] += g
            if world > 1:  # each rank summed its share of the episodes; every rank applies the same mean
                for n in names:
                    torch.distributed.all_reduce(pseudo[n])
                torch.distributed.all_reduce(losses)
            for n, p in zip(names, params):
                p.grad = pseudo[n] / len(batch)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            state["episodes"] += len(batch)
            state["train_seconds"] += time.perf_counter() - tick
            losses = [x if math.isfinite(x) else None for x in (losses / len(batch)).tolist()]  # (0 inner steps)
            record = {"step": step, "loss": losses[0], "loss/adapted": losses[1], "lr": scheduler.get_last_lr()[0],
                      "episodes_per_s": len(batch) / (time.perf_counter() - tick)}
            if m.algorithm == "fomaml":
                record["loss/query"] = losses[2]
            if metrics and (step % t.log_every == 0 or step == t.max_steps):
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                tracker.log({k: v for k, v in record.items() if v is not None})
            bar.update(1)
            if losses[0] is not None:
                bar.set_postfix(loss=f"{losses[0]:.4f}", adapted=f"{losses[1]:.4f}")
            stop = signals.received is not None
            if main and (step % (t.eval_every or t.max_steps) == 0 or step == t.max_steps or stop):
                save_checkpoint(run_dir, step, model, optimizer, scheduler, state, t.keep_checkpoints)
            acc.wait_for_everyone()
            if stop and step < t.max_steps:
                bar.close()
                tracker.close()
                if main:
                    log(f"stopped by {signals.received} at outer step {step}/{t.max_steps}; checkpoint saved. "
                        f"Resume with: sftlab train {run_dir / 'config.yaml'} --resume {run_dir}")
                return run_dir
        bar.close()
        tracker.close()
        if main:
            out = cfg.model_copy(update={"task": "classification", "tasks": None, "meta": None})
            save_best(run_dir, model, tokenizer, out, label_sets[0], step, {})
            summary = {"run_dir": str(run_dir), "algorithm": m.algorithm, "steps": step,
                       "episodes": state["episodes"], "train_seconds": round(state["train_seconds"], 3),
                       "final_loss": losses[0], "final_adapted_loss": losses[1], "processes": world,
                       "meta_learned_head": shared, "precision": "bf16" if bf16 else "fp32", "dev_metrics": {},
                       "timing": timing.report()}  # no phases of its own yet: startup, imports, config, other
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            log(f"meta-training: {step} outer steps, {state['episodes']} episodes in {state['train_seconds']:.1f}s")
        acc.wait_for_everyone()
        return run_dir


def task_groups(cfg: RunConfig, data) -> list[tuple[str, list[int], list[str]]]:
    """(name, rows, class names) of each meta-training task: the tasks: entries, or meta.group_by's groups."""
    enc = data.encoded["train"]
    if cfg.meta.group_by is None:
        return [(h.name, list(range(enc.offsets[k], enc.offsets[k + 1])), h.labels) for k, h in enumerate(enc.heads)]
    from ..data.examples import _column_getter, _header, resolve_path
    from ..data.read import read_table

    d = cfg.data
    table = read_table(resolve_path(d, d.train), header=_header(d), skip_invalid=d.skip_invalid)
    try:
        get = _column_getter(table, cfg.meta.group_by, "group_by")
    except DataError as e:
        raise DataError(str(e).replace("data.group_by", "meta.group_by")) from None
    group_of = {line: str(get(row)) for line, row in table.rows}
    by: dict[str, list[int]] = {}
    for i, e in enumerate(data.splits["train"].examples):
        by.setdefault(group_of[e.line], []).append(i)
    if len(by) < 2:
        raise DataError(f"{table.source}: meta.group_by={cfg.meta.group_by!r} gives {len(by)} group; meta-learning "
                        f"needs two or more tasks")
    return [(f"group {g!r}", rows, data.labels.names) for g, rows in sorted(by.items())]


def task_rows(groups: list[tuple[str, list[int], list[str]]], labels: list[int], need: int) -> list[dict]:
    """Per task: its rows by class, checked to hold `need` (support + query) rows in every class."""
    out = []
    for name, rows, names in groups:
        by_class = [[i for i in rows if labels[i] == c] for c in range(len(names))]
        short = [(names[c], len(r)) for c, r in enumerate(by_class) if len(r) < need]
        if short:
            where = f"tasks.{name}" if not name.startswith("group ") else name
            raise DataError(f"{where}: meta.k_shot (+ meta.query) needs {need} rows per class, but "
                            + ", ".join(f"class {n!r} has {c}" for n, c in short) + "; lower meta.k_shot")
        out.append({"name": name, "by_class": by_class})
    return out


def episodes(tasks: list[dict], n: int, k: int, q: int, seed: int, step: int) -> list[dict]:
    """The outer step's episodes, a pure function of (seed, step): tasks drawn without replacement while they
    last, per class k support and q query rows (disjoint), and a seed for the episode's dropout."""
    rng = np.random.default_rng([seed, step])
    picks = np.concatenate([rng.permutation(len(tasks)) for _ in range(-(-n // len(tasks)))])[:n]
    out = []
    for e, ti in enumerate(picks):
        support, query = [], []
        for rows in tasks[ti]["by_class"]:
            order = rng.permutation(len(rows))
            support += [rows[j] for j in order[:k]]
            query += [rows[j] for j in order[k:k + q]]
        out.append({"task": tasks[ti]["name"], "classes": len(tasks[ti]["by_class"]), "support": sorted(support),
                    "query": sorted(query), "seed": int(rng.integers(2**31))})
    return out


def adapt(model, params: dict, batch: dict, steps: int, lr: float, bf16: bool = False) -> tuple[dict, float, float]:
    """`steps` SGD steps from `params` on one batch (functional: the module's own weights are not touched);
    returns (adapted params, loss at the first step, loss at the last step)."""
    names = list(params)
    first = last = float("nan")
    for s in range(steps):
        loss, grads = loss_and_grads(model, params, batch, names, bf16)
        first = loss if s == 0 else first
        last = loss
        params = {n: (params[n] - lr * g).detach() for n, g in zip(names, grads)}
    return params, first, last


def loss_and_grads(model, params: dict, batch: dict, names: list[str], bf16: bool = False) -> tuple[float, tuple]:
    leaves = {n: params[n].detach().requires_grad_(n in names) for n in params}
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    device = batch["labels"].device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        logits = functional_call(model, leaves, args=(), kwargs=inputs).logits
    loss = F.cross_entropy(logits.float(), batch["labels"])
    grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    return float(loss.detach()), tuple(torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(names, grads))


def head_linear(model) -> list[str]:
    """The parameter names of the head's last Linear (its output size is the number of classes)."""
    heads = anatomy(model).head
    linears = [n.rsplit(".", 1)[0] for n in heads if n.endswith(".weight")]
    last = max(linears, key=lambda m: heads.index(m + ".weight"))
    return [n for n in heads if n.rsplit(".", 1)[0] == last]


def episode_head(model, theta: dict, head: list[str], support: dict, classes: int, init: str, bf16: bool) -> dict:
    """The head's last Linear for one episode: zeros, or Proto-MAML's prototypes: with mu_c the mean over class c's
    support rows of the features that Linear reads (computed without dropout), weight_c = 2 mu_c and
    bias_c = -|mu_c|^2, so logit_c = -|f - mu_c|^2 + |f|^2 and the softmax is the prototype network's."""
    weight = next(n for n in head if n.endswith(".weight"))
    bias = next((n for n in head if n.endswith(".bias")), None)
    out = {n: torch.zeros((classes, *theta[n].shape[1:]), device=theta[n].device) for n in head}
    if init == "zeros":
        return out
    feats = []
    linear = model.get_submodule(weight.rsplit(".", 1)[0])
    hook = linear.register_forward_hook(lambda mod, args, result: feats.append(args[0].detach().float()))
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(support["labels"].device.type, dtype=torch.bfloat16, enabled=bf16):
            functional_call(model, {**theta, **out}, args=(),
                            kwargs={k: v for k, v in support.items() if k != "labels"})
    finally:
        hook.remove()
        model.train()
    f = feats[0] if feats[0].dim() == 2 else feats[0][:, 0]  # (rows, features); a head reading tokens: the first
    mu = torch.stack([f[support["labels"] == c].mean(0) for c in range(classes)])
    out[weight] = 2 * mu
    if bias:
        out[bias] = -(mu * mu).sum(1)
    return out


def to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}
