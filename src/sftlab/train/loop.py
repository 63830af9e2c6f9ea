"""THE training loop, top to bottom: forward, loss, backward, clip, step, schedule, log, evaluate, checkpoint.

One loop for every task and strategy (nanoGPT's train.py; TRL's "read a trainer top to bottom").
Techniques plug in as tasks (tasks/: what the model outputs), objectives (objectives/: how the loss is formed, with
their extra models and streams) and strategies (which parameters train), not new loops. Devices, DDP and autocast
come from `accelerate`; batching is our own so that resume is exact.

Shape (litgpt's `fit(fabric, state, ...)`, torchtune's setup / train / save_checkpoint; fusion-architecture.md W2):
`setup(cfg) -> Run` builds everything a run holds (accelerator, data and streams, model, objective and its extras,
optimizer, schedule, typed LoopState, logs), then `fit(run)` is the loop itself, and `step_update`, `validate`,
`checkpoint` and `finish` are plain functions of `run`. Nothing reads a variable defined after it.
Past ~500 lines on purpose: the loop is the one file a reader follows top to bottom (nanoGPT's train.py), and
splitting setup or the step from it would scatter that reading; the typed state already lives in train/state.py.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
import resource
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list, set_seed
from tqdm.auto import tqdm

from ..strategies import Context as StrategyContext, apply_strategy, layer_scale
from .. import objectives as _objectives  # noqa: F401  (registers the objectives)
from .. import timing
from ..config import RunConfig
from ..data.batches import join, micro_batches, paired_micro_batches, step_batches
from ..data.mixture import Mixture
from ..data.prepare import format_report, prepare
from ..errors import ConfigError, RunDirError, TrainingError
from ..eval.metrics import is_better
from ..models import load_model, load_tokenizer
from ..models.load import attention_for, check_model
from ..models.multihead import check_head_from
from ..allocator import current as allocator
from ..precision import describe as describe_precision, pad_multiple, resolve as resolve_precision
from ..registry import training_objectives
from ..tasks import task_spec
from .checkpoint import complete_checkpoints, load_checkpoint, save_checkpoint, start_checkpoint
from .guards import StopSignals, free_memory, grad_norm as total_grad_norm, is_oom, nonfinite_params, \
    step_delay_for_tests, trim_heap, trim_log
from .optim import build_optimizer, build_schedule, clip_grad_norm, param_groups, sparse_embedding_gradients
from ..models.example_dropout import drawing_for
from . import sharding, zero
from .rundir import check_labels, open_run_dir, save_best
from .state import LoopState, Window
from .tracking import Tracker


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Run:
    """Everything one training run holds, built once by `setup`."""
    cfg: RunConfig
    spec: Any  # tasks.TaskSpec
    acc: Accelerator
    main: bool
    bf16: bool
    run_dir: Path
    signals: StopSignals
    tokenizer: Any
    data: Any  # data.prepare.Prepared
    labels: list[str] | None
    train_data: Any  # the labelled rows, then the unlabelled stream's (one row space)
    dev_data: Any
    n_labelled: int
    mixture: Any  # data.mixture.Mixture for task: multitask, else None
    unlabelled: Any  # the unlabelled stream's encoded rows, or None
    u_seed: int
    lengths: list[int]
    weights: list  # loss units per row
    row_examples: list  # examples per row (packed rows hold several)
    step_size: int
    total_steps: int
    token_budget: int | None
    eval_tokens: int | None
    pad_id: int
    multiple: int
    model: Any  # what is called (DDP-wrapped when world > 1)
    raw_model: torch.nn.Module  # what is saved and evaluated
    sharded: bool  # train.distributed.strategy fsdp in several processes: DTensor parameters (train/sharding.py)
    zero: bool  # train.distributed.strategy deepspeed in several processes: `model` is DeepSpeed's engine (zero.py)
    plan: Any  # strategies.Plan
    objective: Any
    extras: torch.nn.Module  # the objective's trainable modules beside the model
    extra_params: list
    optimizer: Any
    scheduler: Any
    sparse_grads: bool
    state: LoopState
    step: int
    accum: int  # micro-batches per step (train.grad_accum, or what auto_batch_size settled on)
    metrics_file: Any
    ids_file: Any
    tracker: Tracker


def train(cfg: RunConfig, *, resume: str | Path | None = None, overwrite: bool = False, on_eval=None,
          graceful_stop: bool = False, force_resume: bool = False) -> Path:
    """Fine-tune as configured; returns the run directory (best model in RUN_DIR/best).

    `on_eval(step, scores) -> bool`, called after every dev evaluation (on every process); True stops the run
    there (after its checkpoint), as early stopping does: how `sftlab tune` prunes trials.
    `graceful_stop`: SIGTERM/SIGINT save a checkpoint at the next step boundary and return the run directory
    without a summary, to be resumed (the CLI turns it on; in-process callers keep Ctrl-C a KeyboardInterrupt).
    `force_resume`: resume even where the config names another task, model, data or label set (rundir.py)."""
    if cfg.meta is not None:  # the one technique with its own inner/outer loop (DESIGN.md rule 1)
        from .meta_loop import train_meta

        return train_meta(cfg, resume=resume, overwrite=overwrite, on_eval=on_eval, graceful_stop=graceful_stop,
                          force_resume=force_resume)
    with StopSignals(graceful_stop) as signals:
        run = setup(cfg, resume, overwrite, signals, force_resume)
        stopped_by = fit(run, on_eval)
        if stopped_by:
            return stop_here(run, stopped_by)
        return finish(run)


def setup(cfg: RunConfig, resume, overwrite: bool, signals: StopSignals, force_resume: bool = False) -> Run:
    t, spec = cfg.train, task_spec(cfg.task)  # the task decides model head, batches, loss units, evaluation
    Objective = training_objectives.get(cfg.objective.name)
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    # cpu=True without CUDA: accelerate only sets up gloo DDP under torchrun when told it is on CPU.
    # In-process reruns (tune trials, the baseline twin, tests) may change precision; accelerate keeps one global
    # state and refuses a second value unless it is reset (the process group, if any, stays).
    AcceleratorState._reset_state(reset_partial_state=False)
    cpu = not torch.cuda.is_available()
    bf16 = resolve_precision(t.precision)
    if t.precision == "auto" and PartialState(cpu=cpu).num_processes > 1:  # every rank takes rank 0's measurement
        bf16 = bool(broadcast_object_list([bf16])[0])
    # multitask: a step trains one task's head, so the other heads take no part in its graph; DDP must look for them
    # (their gradients stay None, as in one process, so "2 processes == 1" holds: tests/unit/test_ddp.py)
    unused = cfg.task == "multitask" or getattr(Objective, "unused_parameters", False)  # heads without a gradient
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if unused else []
    acc = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=cpu, kwargs_handlers=handlers)
    main = acc.is_main_process
    if t.auto_batch_size and acc.num_processes > 1:
        raise ConfigError("train.auto_batch_size works in one process (an out-of-memory retry on one rank would "
                          "desynchronise the others); set train.batch_size and train.grad_accum by hand")
    set_seed(t.seed)

    # --- run directory, data, model --------------------------------------------------------------------
    check_model(cfg.model.name, from_scratch=cfg.model.from_scratch, max_length=cfg.data.max_length,
                trust_remote_code=cfg.model.trust_remote_code, keep_layers=cfg.model.keep_layers)  # nothing written yet
    Objective.check(cfg)  # e.g. distill's teacher exists and fits
    check_head_from(cfg)  # model.head_from: a head of the multitask run model.name names
    run_dir = open_run_dir(cfg, resume, overwrite, main, acc.wait_for_everyone, force_resume)
    acc.wait_for_everyone()
    with timing.phase("data"):
        tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
        data = prepare(cfg, tokenizer)
    if main:
        log(format_report(data.report(cfg.task)))
        if t.precision == "auto":
            log(describe_precision(bf16, t.precision))
    train_data, dev_data = data.encoded["train"], data.encoded.get("dev")
    heads = getattr(train_data, "heads", None)  # task: multitask: one head per task (tasks/multitask.py)
    labels = [h.to_json() for h in heads] if heads else data.labels.names if data.labels else None
    check_labels(run_dir, labels, resume is not None, main, force_resume)
    step_size = t.batch_size * t.grad_accum * acc.num_processes
    mixture = None
    if heads:  # each step one task's batch, drawn by the sampler; each task's stream keeps its own epochs
        mix = cfg.mixture
        mixture = Mixture([train_data.lengths[a:b] for a, b in zip(train_data.offsets, train_data.offsets[1:])],
                          train_data.offsets, step_size, t.seed, t.group_by_length,
                          mix.sampler if mix else "proportional", mix.temperature if mix else None)
    steps_per_epoch = mixture.steps_per_epoch if mixture else math.ceil(len(train_data) / step_size)
    total_steps = t.max_steps or math.ceil(t.epochs * steps_per_epoch)
    if mixture:
        mixture.total = total_steps  # (the annealed sampler's schedule)
    model_tick = time.perf_counter()
    model = load_model(
        cfg.model.name, cfg.task, heads or labels, from_scratch=cfg.model.from_scratch, seed=t.seed,
        trust_remote_code=cfg.model.trust_remote_code,
        attention=attention_for(cfg.model.attention, cfg.task, cfg.data.max_length), keep_layers=cfg.model.keep_layers,
        train_data=train_data,  # a new MLM head starts as the training text's unigram model
        head_from=cfg.model.head_from, pooling=cfg.model.pooling,
    )
    from ..models.pooling import pooling_of, unused_parameters

    mean_pooled = pooling_of(model) == "mean"
    # Student internals an objective reads (distill's attention / hidden terms): eager attention returns the maps,
    # and the first-token shortcut of the last block would leave one position of its hidden states.
    internals = Objective.internals(cfg)
    if "attentions" in internals:
        model.set_attn_implementation("eager")
    if spec.decoder and cfg.data.packing and not internals:  # per-example attention in packed rows (exact)
        from ..models.packed_attention import use_packed_attention

        use_packed_attention(model)
    if t.fused_attention and not spec.decoder and not internals:  # prefix tuning's cache takes the class path
        from ..models.fused_attention import enable_fused_attention

        fused = enable_fused_attention(model)
    else:
        fused = 0
    if t.first_token_last_layer and spec.head_reads_first_token and not spec.decoder and not internals \
            and not mean_pooled:
        from ..models.first_token import enable_first_token_last_layer

        if enable_first_token_last_layer(model) and main:
            log("last block computed for the first token only (the head reads nothing else; exact)")
    if t.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad, so frozen embeddings work as they are.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    plan = apply_strategy(model, cfg.strategy, StrategyContext(cfg.task, steps_per_epoch, cfg.data.max_length))
    if plan.optimize_frozen and acc.num_processes > 1:
        raise ConfigError(f"strategy.name: {cfg.strategy.name} trains in one process (DDP fixes the trained "
                          "parameters when it starts); run without torchrun/accelerate launch")
    model = plan.model
    # After the strategy: LoRA's and adapters' own dropouts are nn.Dropout too (LoRA's masks were 20% of a packed
    # smollm2 step under torch's bernoulli_, issue 22).
    if t.fast_dropout and acc.device.type == "cpu":
        from ..models.fast_dropout import use_fast_dropout

        use_fast_dropout(model)
    if bf16:  # LoRA's forward without its fp32 round trip under autocast (models/fast_lora.py)
        from ..models.fast_lora import use_fast_lora

        use_fast_lora(model)
    if t.example_dropout:
        from ..models.example_dropout import use_example_dropout

        if cfg.data.unlabelled is not None:
            raise ConfigError("train.example_dropout keys masks by the batch's rows; with data.unlabelled the "
                              "streams are batched apart: turn one of them off")
        attn_p = max(float(getattr(model.config, k, 0) or 0) for k in ("attention_probs_dropout_prob",
                                                                        "attention_dropout"))
        if attn_p > 0 and not fused:
            raise ConfigError("train.example_dropout needs train.fused_attention for this model's attention "
                              f"dropout ({attn_p}), which otherwise runs inside torch's kernel; turn it on")
        use_example_dropout(model)
    for p in unused_parameters(model):  # BERT's pooler, bypassed by model.pooling: mean
        p.requires_grad_(False)
    model.to(acc.device)
    if bf16 and plan.frozen_base_not_saved and t.distributed.strategy != "fsdp":
        from ..precision import frozen_linears_to_bf16

        frozen_linears_to_bf16(model)
    # fsdp: shard before the optimizer exists (it must hold the sharded parameters) and instead of DDP's wrapper.
    sharded = t.distributed.strategy == "fsdp" and acc.num_processes > 1
    if t.distributed.strategy == "fsdp":  # checked in one process too: the config fails before a cluster job does
        sharding.check(cfg, model)
    # deepspeed: the engine wraps model and optimizer after the resume (it takes their loaded state), not DDP
    use_zero = t.distributed.strategy == "deepspeed" and acc.num_processes > 1
    if t.distributed.strategy == "deepspeed":
        zero.check(cfg)
    if sharded:
        model = sharding.shard(model, cfg)
    # The training objective (objective.name: sft, distill) forms each micro-batch's loss from the task's loss and
    # whatever it brings (distill: the teacher's cached logits, computed here once before training).
    timing.add("model", time.perf_counter() - model_tick)
    with timing.phase("objective"):  # e.g. distill's teacher logits, cached here once
        objective = Objective(cfg, data, spec.loss, tokenizer)
    model_tick = time.perf_counter()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    multiple = pad_multiple(t.pad_to_multiple_of, bf16, acc.device)

    # A second stream (data.unlabelled): its rows follow the labelled ones in one row space and are drawn per step
    # with their own epochs and order (seeded apart), so a micro-batch mixes both and runs one forward and backward.
    n_labelled, unlabelled = len(train_data), data.encoded.get("unlabelled")
    if unlabelled is not None and not getattr(objective, "reads_unlabelled", True):
        unlabelled = None  # (mmd / dann at weight 0 are plain SFT: the stream is not drawn, so the run is SFT's)
    if unlabelled is not None:
        train_data = join(train_data, unlabelled, float("nan") if cfg.task == "regression" else -100)
    lengths = train_data.lengths
    token_budget = t.micro_batch_tokens
    if token_budget == "auto":  # the typical batch's padded size; only outliers get cut
        p90 = max(1, int(np.percentile(lengths[:n_labelled], 90))) if lengths else None
        token_budget = t.batch_size * p90 if p90 else None
        if spec.decoder and p90:
            # Decoders: ~512-token micro-batches. smollm2-135m LoRA on packed 512-token rows (batch 8, bf16, no
            # activation checkpointing): 512 -> 237/217 tokens/s at 2.4 GB peak, 1024 -> 204/248 at 3.3 GB, 2048 ->
            # 196 at 4.8 GB, 4096 (whole batch) 11.7 GB (issue 22): the matmuls stay efficient at 512 rows of
            # hidden size, and the activations kept for backward scale with the micro-batch.
            token_budget = min(token_budget, max(p90, 512))
    # Loss units per row: 1 per example (classification), loss tokens per row (causal LM); unlabelled rows none. A
    # step's summed loss is divided by its rows' total, so accumulation, processes and packing give the same mean.
    unl_zeros = [0] * (len(train_data) - n_labelled)
    if (sharded or use_zero) and t.lazy_embeddings:  # its row-wise update reads whole embedding rows; a shard
        t = t.model_copy(update={"lazy_embeddings": False})  # holds some rows
        if main:
            log(f"train.distributed {t.distributed.strategy}: embeddings updated densely (train.lazy_embeddings off)")
    optimizer = build_optimizer(model, t, layer_scale(plan, cfg.strategy.layer_decay), plan.optimize_frozen)
    # Trainable extras beside the model (distill's hidden projection): the optimizer's last groups, in every checkpoint
    extras = objective.extras().to(acc.device)
    # (an objective may train its extras faster: DANN's domain classifier, objective.classifier_lr_scale)
    for group in param_groups(extras, t.weight_decay, t.lr, getattr(objective, "extras_lr_scale", None)):
        optimizer.add_param_group(group)
    if (sharded or use_zero) and len(list(extras.parameters())):
        raise ConfigError(f"objective.name: {cfg.objective.name} trains modules beside the model, which "
                          f"train.distributed.strategy: {t.distributed.strategy} does not shard yet; use ddp")
    # Lazy embeddings in one process also get row-sparse gradients (DDP keeps dense ones: its reducer is tested so)
    sparse_grads = t.lazy_embeddings and acc.num_processes == 1 and sparse_embedding_gradients(model)
    scheduler = build_schedule(optimizer, t, total_steps)
    model = model if sharded or use_zero else acc.prepare_model(model)
    raw_model = model if sharded or use_zero else acc.unwrap_model(model)
    timing.add("model", time.perf_counter() - model_tick)

    # --- resume: model, extras, optimizer, scheduler, RNG and data position ---------------------------------
    state, step = LoopState(streams={"unlabelled": [0, 0]} if unlabelled is not None else {}), 0
    ckpts = complete_checkpoints(run_dir) if resume else []
    if ckpts:
        raw = load_checkpoint(ckpts[-1], raw_model, optimizer, scheduler, extras)
        step, state = raw.pop("step"), LoopState.from_json(raw)
        frozen = objective.frozen()
        if state.frozen is not None and state.frozen != frozen:  # a teacher is never saved: only its fingerprint
            changed = [k for k in frozen if state.frozen.get(k) != frozen[k]]
            raise RunDirError(f"--resume {run_dir}: the {', '.join(changed) or 'frozen model'} changed since this "
                              f"run started (objective.{(changed or ['teacher'])[0]}: other weights); resume with the "
                              f"same one, or start a new run")
        if main:
            log(f"resumed from {ckpts[-1]} at step {step}/{total_steps}")
    if use_zero:
        model = zero.wrap(model, optimizer, cfg)
    if main and resume:  # a killed run may have logged steps past its checkpoint: the replay logs them again
        for name in ("metrics.jsonl", "example_ids.jsonl"):
            trim_log(run_dir / name, step)
    return Run(
        cfg=cfg, spec=spec, acc=acc, main=main, bf16=bf16, run_dir=run_dir, signals=signals, tokenizer=tokenizer,
        data=data, labels=labels, train_data=train_data, dev_data=dev_data, n_labelled=n_labelled, mixture=mixture,
        unlabelled=unlabelled, u_seed=t.seed * 7 + zlib.crc32(b"unlabelled") % 1_000_003, lengths=lengths,
        weights=list(spec.units(train_data))[:n_labelled] + unl_zeros,
        row_examples=list(spec.examples(train_data))[:n_labelled] + unl_zeros,  # packs count their examples
        step_size=step_size, total_steps=total_steps, token_budget=token_budget,
        eval_tokens=4 * token_budget if token_budget else None,  # no activations kept for backward: ~4x the tokens
        pad_id=pad_id, multiple=multiple, model=model, raw_model=raw_model, sharded=sharded, zero=use_zero, plan=plan,
        objective=objective,
        extras=extras, extra_params=list(extras.parameters()), optimizer=optimizer, scheduler=scheduler,
        sparse_grads=sparse_grads, state=state, step=step,
        accum=(state.grad_accum or t.grad_accum) if t.auto_batch_size else t.grad_accum,
        metrics_file=open(run_dir / "metrics.jsonl", "a") if main else None,
        ids_file=open(run_dir / "example_ids.jsonl", "a") if main and t.log_example_ids else None,
        tracker=Tracker(run_dir, cfg, resume_step=step if ckpts else None, enabled=main),
    )


# --- the loop --------------------------------------------------------------------------------------------------
def fit(run: Run, on_eval=None) -> str | None:
    """Train to run.total_steps (or an early stop); returns what stopped it early by signal, else None."""
    t, state, acc = run.cfg.train, run.state, run.acc
    run.model.train()
    bar = tqdm(total=run.total_steps, initial=run.step, desc="train", unit="step",
               disable=not (run.main and t.progress), file=sys.stderr, dynamic_ncols=True)
    window = Window.open(state, acc.device, run.main)
    stop = run.step >= run.total_steps
    trim_heap()  # tokenization and loading garbage
    delay = step_delay_for_tests()
    while not stop:
        epoch = state.epoch
        batches = run.mixture.epoch(epoch) if run.mixture else \
            step_batches(run.lengths[:run.n_labelled], run.step_size, t.seed, epoch, t.group_by_length)
        for step_batch in batches[state.step_in_epoch:]:
            if delay:
                time.sleep(delay)
            tick = time.perf_counter()
            if run.plan.on_step:
                run.plan.on_step(run.step)
            if hasattr(run.objective, "on_step"):  # e.g. DANN's reversal schedule
                run.objective.on_step(run.step, run.total_steps)
            grad_norm, skipped, signalled = step_update(run, step_batch, window)
            run.step += 1
            step = run.step
            state.step_in_epoch += 1
            state.examples += sum(run.row_examples[i] for i in step_batch)
            state.tokens += sum(run.lengths[i] for i in step_batch)
            window.examples += sum(run.row_examples[i] for i in step_batch)
            if run.ids_file:
                run.ids_file.write(json.dumps({"step": step, "ids": step_batch}) + "\n")
                run.ids_file.flush()
            if skipped:
                write(run, {"step": step, "skipped": skipped})
                if run.main:
                    bar.write(f"warning: step {step}: {skipped}; skipped it (weights, optimizer and schedule "
                              f"unchanged), {state.bad_steps} in a row", file=sys.stderr)
                if state.bad_steps >= t.max_bad_steps:
                    raise TrainingError(
                        f"step {step}: {skipped} in {state.bad_steps} steps in a row (train.max_bad_steps), "
                        "none of them applied; lower train.lr, keep train.max_grad_norm set, try "
                        f"train.precision=fp32 or check the data, then resume with --resume {run.run_dir}")
            tock = time.perf_counter() - tick
            state.train_seconds += tock
            window.seconds += tock
            timing.add("loop", tock)
            bar.update(1)
            epoch_end = state.step_in_epoch == len(batches)
            if epoch_end:
                state.epoch, state.step_in_epoch = epoch + 1, 0

            if (step % t.log_every == 0 or step == run.total_steps) and window.units:
                window.collapse(acc.num_processes, run.main)  # the whole batch's sums (every rank takes part)
                record = {"step": step, "epoch": round(state.epoch + state.step_in_epoch / len(batches), 4),
                          "loss": float(window.loss) / max(1, window.units),
                          "lr": max(run.scheduler.get_last_lr()), "examples_per_s": window.examples / window.seconds}
                if t.max_grad_norm:
                    record["grad_norm"] = float(grad_norm)
                for name, part in window.parts.items():  # per-part losses on the loss's scale (torchtune's KD recipe)
                    if name.startswith("task/"):  # a multitask run: that task's mean over its own steps
                        n = float(window.parts[f"units/{name[5:]}"])
                        record[f"loss/{name[5:]}"] = float(part) / max(1, n)
                    elif not name.startswith("units/"):
                        record[f"loss/{name}"] = float(part) / max(1, window.units)
                write(run, record)
                state.last_loss = record["loss"]
                bar.set_postfix(loss=f"{record['loss']:.4f}", ex_s=f"{record['examples_per_s']:.0f}")
                window.reset()

            stop = step >= run.total_steps
            due = (step % t.eval_every == 0) if t.eval_every else epoch_end
            if due or stop:
                stop = validate_and_save(run, window, bar, on_eval) or stop
            if signalled and not stop:  # SIGTERM/SIGINT: checkpoint at this step boundary, then return
                if not due:  # (an evaluation step has just saved one)
                    refuse_nonfinite(run)
                    checkpoint(run, window)
                bar.close()
                return run.signals.received or "a signal to another process"
            if stop:
                break
    bar.close()
    return None


def step_update(run: Run, step_batch: list[int], window: Window) -> tuple[torch.Tensor, str | None, bool]:
    """Forward, backward, clip and (unless the loss or gradient is non-finite) update: one optimizer step.
    Returns (gradient norm, why the update was skipped or None, whether a stop signal arrived anywhere)."""
    t, acc, state = run.cfg.train, run.acc, run.state
    units = {"train": run.spec.step_units(run.train_data, step_batch, state.epoch) if run.spec.step_units
             else sum(run.weights[i] for i in step_batch)}  # loss units of this step, per stream (MLM: per epoch)
    rows = step_batch
    if run.unlabelled is not None:
        extra = next_unlabelled(run)
        rows, units["unlabelled"] = step_batch + extra, len(extra)
    step_loss, step_parts = forward_backward(run, rows, units)
    if run.extra_params and acc.num_processes > 1:  # outside DDP: averaged by hand, as DDP averages the model's
        for p in run.extra_params:
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= acc.num_processes
    params = [*run.model.parameters(), *run.extra_params]
    if run.zero:  # DeepSpeed measures, clips and checks the norm in its own step, below
        grad_norm = torch.zeros(())
    elif run.sharded:  # the norm over every shard, as one process would compute it
        grad_norm = sharding.grad_norm(params, t.max_grad_norm)
    elif run.sparse_grads:  # torch's clip refuses sparse gradients; ours takes both (inf: measure only)
        grad_norm = clip_grad_norm(params, t.max_grad_norm or float("inf"), run.optimizer)
    elif t.max_grad_norm:
        grad_norm = acc.clip_grad_norm_(params, t.max_grad_norm)
    else:
        grad_norm = total_grad_norm(params)
    # The one host sync per step: a non-finite loss or gradient skips the update (weights, optimizer and
    # schedule untouched; the data position still advances); a signal on any process stops after it.
    flags = torch.stack([~torch.isfinite(step_loss), ~torch.isfinite(grad_norm.to(step_loss.device)),
                         torch.tensor(run.signals.received is not None, device=step_loss.device)]).float()
    if acc.num_processes > 1:
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    bad_loss, bad_grad, signalled = flags.tolist()
    skipped = "non-finite loss" if bad_loss else "non-finite grad" if bad_grad else None
    if run.zero:  # every rank steps the engine (it also clears ZeRO's reduced gradients); it skips a non-finite norm
        grad_norm, finite = zero.step(run.model)
        skipped = skipped or (None if finite else "non-finite grad")
    elif skipped is None:
        run.optimizer.step()
    if skipped is None:
        run.scheduler.step()
        window.loss += step_loss
        for name, part in step_parts.items():
            window.parts[name] = window.parts.get(name, 0) + part
        window.units += units["train"]
        if run.mixture:  # multitask: each task's own mean loss in the log line (loss/NAME; units/NAME not logged)
            name = run.train_data.heads[run.train_data.task_of(step_batch[0])].name
            window.parts[f"task/{name}"] = window.parts.get(f"task/{name}", 0) + step_loss.detach().float()
            window.parts[f"units/{name}"] = window.parts.get(f"units/{name}", 0) + torch.tensor(
                float(units["train"]), device=step_loss.device)
        state.bad_steps = 0
    else:
        state.bad_steps += 1
        state.skipped_steps += 1
    run.optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped, bool(signalled)


def next_unlabelled(run: Run) -> list[int]:
    """This step's unlabelled rows (as many as a labelled step), advancing the stream's own position."""
    t = run.cfg.train
    epoch_u, at = run.state.streams["unlabelled"]
    batches_u = step_batches(run.unlabelled.lengths, run.step_size, run.u_seed, epoch_u, t.group_by_length)
    if at >= len(batches_u):  # the stream wraps into its next epoch on its own
        epoch_u, at = epoch_u + 1, 0
        batches_u = step_batches(run.unlabelled.lengths, run.step_size, run.u_seed, epoch_u, t.group_by_length)
    run.state.streams["unlabelled"] = [epoch_u, at + 1]
    return [run.n_labelled + i for i in batches_u[at]]


def forward_backward(run: Run, rows: list[int], units: dict[str, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward and backward of one step's micro-batches; its summed loss and loss parts, on the device (no host
    sync). Out of memory with train.auto_batch_size: halve the micro-batch, double accumulation, redo the step."""
    t, acc = run.cfg.train, run.acc
    rng = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    def split(rank: int) -> list[list[int]]:
        if run.unlabelled is None:
            return micro_batches(rows, run.lengths, acc.num_processes, rank, run.accum, run.token_budget)
        labelled = [r for r in rows if r < run.n_labelled]  # both streams in every micro-batch, in the step's
        return paired_micro_batches(labelled, rows[len(labelled):], run.lengths, acc.num_processes,  # proportion
                                    rank, run.accum, run.token_budget)

    while True:
        micro = split(acc.process_index)
        # Every rank must take part in the step's collectives: DDP's all-reduce (one pass at least) and, under
        # fsdp, the gathers of every pass (as many passes as the busiest rank). A rank short of rows (a short last
        # step, a token budget cutting its long rows finer) runs zero-weighted passes on a row of the step. The
        # counts are computed, not exchanged: every rank knows the step's rows and the split.
        most = max(len(split(r)) for r in range(acc.num_processes)) if run.sharded or run.zero else 1
        fillers = max(0, most - len(micro)) if acc.num_processes > 1 else 0
        try:
            return micro_pass(run, micro + [rows[:1]] * fillers, units, len(micro))
        except Exception as e:  # noqa: BLE001  (only out-of-memory is handled; the rest re-raises)
            if not is_oom(e):
                raise
            oom = (str(e).splitlines() or [type(e).__name__])[0]
        # Outside `except`: the traceback, and the activations its frames hold, are gone before freeing.
        run.optimizer.zero_grad(set_to_none=True)
        free_memory()
        size = max(len(m) for m in micro)  # a token budget may already have cut some: halve the largest
        if not t.auto_batch_size:
            raise TrainingError(f"step {run.step + 1}: out of memory with a micro-batch of {size} ({oom}); set "
                                "train.auto_batch_size=true, or lower train.batch_size and raise "
                                "train.grad_accum (same examples per step)")
        if size <= 1:
            raise TrainingError(f"step {run.step + 1}: out of memory even with a micro-batch of 1 ({oom}); lower "
                                "data.max_length, set train.gradient_checkpointing=true, or use a LoRA strategy "
                                "or a smaller model")
        run.accum *= 2
        torch.set_rng_state(rng[0])  # the retry draws the same dropout masks as a run set to this size
        if rng[1] is not None:
            torch.cuda.set_rng_state_all(rng[1])
        if run.main:
            log(f"out of memory at step {run.step + 1} with a micro-batch of {size}: retrying the step with "
                f"{-(-size // 2)} (train.grad_accum {run.accum}, same examples per step)")


def micro_pass(run: Run, micro: list[list[int]], units: dict[str, int], real: int | None = None
               ) -> tuple[torch.Tensor, dict]:
    """Forward and backward of each micro-batch; those from index `real` on are fillers, weighted 0."""
    acc = run.acc
    real = len(micro) if real is None else real
    step_loss, parts = torch.zeros((), device=acc.device), {}

    def collate(rows: list[int]) -> dict[str, torch.Tensor]:
        return {key: v.to(acc.device) for key, v in run.spec.collate(run.train_data, rows, run.pad_id, run.multiple,
                                                                      epoch=run.state.epoch).items()}

    for k, idx in enumerate(micro):
        lab = [i for i in idx if i < run.n_labelled] if run.unlabelled is not None else idx
        if getattr(run.objective, "streams_apart", False) and 0 < len(lab) < len(idx):
            # Each stream padded to its own longest row, as two forwards (objectives/domain.py: why)
            batch = {"train": collate(lab), "unlabelled": collate([i for i in idx if i >= run.n_labelled])}
        else:
            batch = collate(idx)
        sync = k == len(micro) - 1
        if run.zero:  # the step's last micro-batch reduces the gradients (zero.py)
            run.model.set_gradient_accumulation_boundary(sync)
        backward = (lambda x: run.model.backward(x, scale_wrt_gas=False)) if run.zero else acc.backward
        masks = drawing_for(run.cfg.train.seed, run.step, idx, acc.device) if run.cfg.train.example_dropout \
            else contextlib.nullcontext()  # (through backward too: checkpointed layers redraw their masks)
        with masks:
            with contextlib.nullcontext() if sync or run.zero else acc.no_sync(run.model), acc.autocast():
                out = run.objective(run.model, batch, idx, units)
            # Sum / step units (x world, undone by DDP's mean): exactly the mean over the step batch.
            if k >= real:  # a filler: the collectives run, the gradients stay as the real passes left them
                backward(out.total * 0.0)
                continue
            backward(out.total * acc.num_processes / units["train"])
        step_loss += out.total.detach().float()
        for name, part in out.parts.items():
            parts[name] = parts.get(name, 0) + part.float()
    return step_loss, parts


# --- validate, save, checkpoint --------------------------------------------------------------------------------
def validate(run: Run, encoded, model: torch.nn.Module | None = None) -> dict:
    """The task's scores of `model` (the run's own by default) on encoded rows."""
    t = run.cfg.train
    trim_heap()  # evaluation batches have new shapes: start it on a compact heap, and leave one behind
    try:
        return run.spec.evaluate(model or run.raw_model, encoded, batch_size=t.eval_batch_size, pad_id=run.pad_id,
                                 device=run.acc.device, bf16=run.bf16, max_tokens=run.eval_tokens,
                                 pad_multiple=run.multiple)
    finally:
        trim_heap()


def validate_and_save(run: Run, window: Window, bar, on_eval) -> bool:
    """At an evaluation point: dev scores, best/ when they improve, a checkpoint; True when the run should stop
    here (the caller's on_eval, early stopping)."""
    t, state, metric, step = run.cfg.train, run.state, run.cfg.best_metric, run.step
    refuse_nonfinite(run)
    if hasattr(run.objective, "before_eval"):  # parts of the model fit outside the optimizer (contrastive_pairs' head)
        run.objective.before_eval(run.raw_model)
    # The checkpoint's tensor files are written beside the evaluation, which changes none of them (issue 22);
    # state.json (with this evaluation's scores) completes it after. Sharded runs gather collectively: in order.
    pending = start_checkpoint(run.run_dir, run.step, run.raw_model, run.optimizer, run.extras) \
        if run.main and not run.sharded and not run.zero and run.dev_data is not None else None
    scores = None
    if run.dev_data is not None:
        with timing.phase("eval"):
            scores = validate(run, run.dev_data)
        write(run, {"step": step, "split": "dev", **scores})
        if run.main:
            bar.write(f"step {step}: dev " + " ".join(f"{k}={v:.4f}" for k, v in scores.items()), file=sys.stderr)
        if is_better(metric, scores[metric], state.best):
            state.best, state.best_step, state.bad_evals, state.best_scores = scores[metric], step, 0, scores
            best(run, scores)
        else:
            state.bad_evals += 1
    else:
        best(run, {})
    checkpoint(run, window, pending)
    stop = False
    if on_eval is not None and scores is not None and on_eval(step, scores):
        if run.main:
            bar.write(f"stopped at step {step} by the caller (e.g. a pruned tuning trial)", sys.stderr)
        state.stopped_early = True
        stop = True
    patience = t.early_stopping_patience
    if patience is not None and state.bad_evals >= patience:
        if run.main:
            bar.write(f"early stopping: no {metric} improvement in {patience} evaluations", sys.stderr)
        stop = True
    return stop


def best(run: Run, scores: dict) -> None:
    """RUN_DIR/best: a plain HF folder; under fsdp the full weights are gathered first (every rank takes part)."""
    full = sharding.full_model_state(run.raw_model) if run.sharded else \
        zero.full_model_state(run.model) if run.zero else None
    if run.main:
        with timing.phase("save"):
            save_best(run.run_dir, run.raw_model, run.tokenizer, run.cfg, run.labels, run.step, scores, state_dict=full)


def refuse_nonfinite(run: Run) -> None:
    bad = sharding.nonfinite_params(run.raw_model) if run.sharded else \
        zero.nonfinite_params(zero.full_model_state(run.model)) if run.zero else nonfinite_params(run.raw_model)
    if bad:
        raise TrainingError(f"step {run.step}: the weights hold NaN/inf ({bad[0]}" + (f" and {len(bad) - 1} more"
                            if len(bad) > 1 else "") + "), so nothing was saved; lower train.lr or use "
                            f"train.precision=fp32, and resume from the last checkpoint in {run.run_dir}/checkpoints")


def checkpoint(run: Run, window: Window, pending=None) -> None:
    # The open log window travels with the checkpoint so a resumed run logs exactly what it would have.
    window.collapse(run.acc.num_processes, run.main)  # (rank 0 writes the checkpoint)
    window.save_into(run.state)
    run.state.grad_accum = run.accum
    run.state.frozen = run.objective.frozen()
    full = {}
    if run.sharded:  # gathered on every rank; rank 0 writes the files a single process would
        full = {"model_state": sharding.full_model_state(run.raw_model),
                "optimizer_state": sharding.full_optimizer_state(run.raw_model, run.optimizer)}
    elif run.zero:
        full = {"model_state": zero.full_model_state(run.model),
                "optimizer_state": zero.full_optimizer_state(run.model, run.optimizer)}
    if run.main:
        with timing.phase("save"):
            save_checkpoint(run.run_dir, run.step, run.raw_model, run.optimizer, run.scheduler,
                            run.state.to_json(), run.cfg.train.keep_checkpoints, run.extras, **full,
                            pending=pending)  # (tensor files begun before the evaluation: validate_and_save)
    run.acc.wait_for_everyone()


def write(run: Run, record: dict) -> None:
    if run.metrics_file:
        run.metrics_file.write(json.dumps(record) + "\n")
        run.metrics_file.flush()
        run.tracker.log(record)


# --- the end: a signal's stop, or the summary --------------------------------------------------------------------
def stop_here(run: Run, stopped_by: str) -> Path:
    if run.ids_file:
        run.ids_file.close()
    if run.main:
        run.metrics_file.close()
        run.tracker.close()
        log(f"stopped by {stopped_by} at step {run.step}/{run.total_steps}; checkpoint saved. Resume with: "
            f"sftlab train {run.run_dir / 'config.yaml'} --resume {run.run_dir}")
    run.acc.wait_for_everyone()
    return run.run_dir


def finish(run: Run) -> Path:
    """The summary: best model on test, throughput, memory."""
    if run.ids_file:
        run.ids_file.close()
    state, acc, raw_model = run.state, run.acc, run.raw_model
    summary = {
        "run_dir": str(run.run_dir), "steps": run.step, "examples": state.examples,
        "train_seconds": round(state.train_seconds, 3),
        "train_examples_per_s": state.examples / max(state.train_seconds, 1e-9),
        "train_tokens": state.tokens, "train_tokens_per_s": state.tokens / max(state.train_seconds, 1e-9),
        "final_loss": state.last_loss,
        "trainable_params": sum(getattr(p, "ds_numel", p.numel()) for p in raw_model.parameters() if p.requires_grad),
        "total_params": sum(getattr(p, "ds_numel", p.numel()) for p in raw_model.parameters()),  # (ZeRO-3: partitioned)
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "best_metric": run.cfg.best_metric, "best_step": state.best_step, "dev_metrics": state.best_scores,
        "processes": acc.num_processes, "distributed": run.cfg.train.distributed.strategy if acc.num_processes > 1
        else None, "device": str(acc.device), "precision": "bf16" if run.bf16 else "fp32",
        "data": run.data.report(run.cfg.task),
        "grad_accum": run.accum, "micro_batch_size": -(-run.step_size // (acc.num_processes * run.accum)),
        "micro_batch_tokens": run.token_budget, "pad_to_multiple_of": run.multiple, "allocator": allocator(),
        "skipped_steps": state.skipped_steps,
    }
    if torch.cuda.is_available():
        summary["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if "test" in run.data.encoded:
        from ..eval.evaluate import load_trained

        with timing.phase("test"):
            best_model, _, _ = load_trained(run.run_dir, device=acc.device)
            summary["test_metrics"] = validate(run, run.data.encoded["test"], best_model)
    summary["timing"] = timing.report()  # where this process's wall time went (timing.py)
    timing.reset()
    if run.main:
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        run.metrics_file.close()
        run.tracker.close(summary)
        log(f"done: {run.step} steps in {summary['train_seconds']:.1f}s, {summary['train_examples_per_s']:.1f} "
            f"examples/s")
        for split in ("dev", "test"):
            if summary.get(f"{split}_metrics"):
                scores = " ".join(f"{k}={v:.4f}" for k, v in summary[f"{split}_metrics"].items())
                log(f"{split} metrics (best model, step {state.best_step}): {scores}")
    acc.wait_for_everyone()
    return run.run_dir
