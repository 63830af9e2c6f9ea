"""THE training loop, top to bottom: forward, loss, backward, clip, step, schedule, log, evaluate, checkpoint.

One loop for every task and strategy (nanoGPT's train.py; TRL's "read a trainer top to bottom").
Techniques plug in as objectives (loss functions) and strategies (which parameters train), not new loops.
Devices, DDP and autocast come from `accelerate`; batching is our own so that resume is exact.
"""
from __future__ import annotations

import contextlib
import json
import math
import resource
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm

from ..strategies import Context as StrategyContext, apply_strategy, layer_scale
from .. import objectives as _objectives  # noqa: F401  (registers the objectives)
from ..config import RunConfig, dump_config
from ..data.batches import join, micro_batches, step_batches
from ..data.prepare import format_report, prepare
from ..errors import ConfigError, RunDirError, TrainingError
from ..eval.metrics import is_better
from ..models import load_model, load_tokenizer
from ..models.load import attention_for, check_model
from ..allocator import current as allocator
from ..precision import describe as describe_precision, pad_multiple, resolve as resolve_precision
from ..registry import training_objectives
from ..tasks import task_spec
from .checkpoint import complete_checkpoints, load_checkpoint, save_checkpoint
from .guards import StopSignals, free_memory, grad_norm as total_grad_norm, is_oom, nonfinite_params, \
    step_delay_for_tests, trim_heap, trim_log
from .optim import build_optimizer, build_schedule, clip_grad_norm, param_groups, sparse_embedding_gradients
from .rundir import check_labels, open_run_dir, save_best
from .tracking import Tracker


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train(cfg: RunConfig, *, resume: str | Path | None = None, overwrite: bool = False, on_eval=None,
          graceful_stop: bool = False, force_resume: bool = False) -> Path:
    """Fine-tune as configured; returns the run directory (best model in RUN_DIR/best).

    `on_eval(step, scores) -> bool`, called after every dev evaluation (on every process); True stops the run
    there (after its checkpoint), as early stopping does: how `sftlab tune` prunes trials.
    `graceful_stop`: SIGTERM/SIGINT save a checkpoint at the next step boundary and return the run directory
    without a summary, to be resumed (the CLI turns it on; in-process callers keep Ctrl-C a KeyboardInterrupt).
    `force_resume`: resume even where the config names another task, model, data or label set (rundir.py)."""
    with StopSignals(graceful_stop) as signals:
        return _train(cfg, resume, overwrite, on_eval, signals, force_resume)


def _train(cfg: RunConfig, resume, overwrite: bool, on_eval, signals: StopSignals, force_resume: bool = False) -> Path:
    t, spec = cfg.train, task_spec(cfg.task)  # the task decides model head, batches, loss units, evaluation
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
    acc = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=cpu)
    main = acc.is_main_process
    if t.auto_batch_size and acc.num_processes > 1:
        raise ConfigError("train.auto_batch_size works in one process (an out-of-memory retry on one rank would "
                          "desynchronise the others); set train.batch_size and train.grad_accum by hand")
    set_seed(t.seed)

    # --- run directory, data, model --------------------------------------------------------------------
    check_model(cfg.model.name, from_scratch=cfg.model.from_scratch, max_length=cfg.data.max_length,
                trust_remote_code=cfg.model.trust_remote_code, keep_layers=cfg.model.keep_layers)  # nothing written yet
    training_objectives.get(cfg.objective.name).check(cfg)  # e.g. distill's teacher exists and fits
    run_dir = open_run_dir(cfg, resume, overwrite, main, acc.wait_for_everyone, force_resume)
    acc.wait_for_everyone()
    tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
    data = prepare(cfg, tokenizer)
    if main:
        log(format_report(data.report(cfg.task)))
        if t.precision == "auto":
            log(describe_precision(bf16, t.precision))
    labels = data.labels.names if data.labels else None
    check_labels(run_dir, labels, resume is not None, main, force_resume)
    train_data, dev_data = data.encoded["train"], data.encoded.get("dev")
    step_size = t.batch_size * t.grad_accum * acc.num_processes
    steps_per_epoch = math.ceil(len(train_data) / step_size)
    total_steps = t.max_steps or math.ceil(t.epochs * steps_per_epoch)
    model = load_model(
        cfg.model.name, cfg.task, labels, from_scratch=cfg.model.from_scratch, seed=t.seed,
        trust_remote_code=cfg.model.trust_remote_code,
        attention=attention_for(cfg.model.attention, cfg.task, cfg.data.max_length), keep_layers=cfg.model.keep_layers,
    )
    # Student internals an objective reads (distill's attention / hidden terms): eager attention returns the maps,
    # and the first-token shortcut of the last block would leave one position of its hidden states.
    internals = training_objectives.get(cfg.objective.name).internals(cfg)
    if "attentions" in internals:
        model.set_attn_implementation("eager")
    if t.fused_attention and not spec.decoder and not internals:  # prefix tuning's cache takes the class path
        from ..models.fused_attention import enable_fused_attention

        enable_fused_attention(model)
    if t.first_token_last_layer and not spec.decoder and not internals:
        from ..models.first_token import enable_first_token_last_layer

        if enable_first_token_last_layer(model) and main:
            log("last block computed for the first token only (the head reads nothing else; exact)")
    if t.fast_dropout and acc.device.type == "cpu":
        from ..models.fast_dropout import use_fast_dropout

        use_fast_dropout(model)
    if t.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad, so frozen embeddings work as they are.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    plan = apply_strategy(model, cfg.strategy, StrategyContext(cfg.task, steps_per_epoch, cfg.data.max_length))
    if plan.optimize_frozen and acc.num_processes > 1:
        raise ConfigError(f"strategy.name: {cfg.strategy.name} trains in one process (DDP fixes the trained "
                          "parameters when it starts); run without torchrun/accelerate launch")
    model = plan.model
    model.to(acc.device)
    # The training objective (objective.name: sft, distill) forms each micro-batch's loss from the task's loss and
    # whatever it brings (distill: the teacher's cached logits, computed here once before training).
    objective = training_objectives.get(cfg.objective.name)(cfg, data, spec.loss, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    multiple = pad_multiple(t.pad_to_multiple_of, bf16, acc.device)

    # A second stream (data.unlabelled): its rows follow the labelled ones in one row space and are drawn per step
    # with their own epochs and order (seeded apart), so a micro-batch mixes both and runs one forward and backward.
    n_labelled, unlabelled = len(train_data), data.encoded.get("unlabelled")
    if unlabelled is not None:
        train_data = join(train_data, unlabelled)
        u_seed = t.seed * 7 + zlib.crc32(b"unlabelled") % 1_000_003
    lengths = train_data.lengths
    token_budget = t.micro_batch_tokens
    if token_budget == "auto":  # the typical batch's padded size; only outliers get cut
        token_budget = t.batch_size * max(1, int(np.percentile(lengths[:n_labelled], 90))) if lengths else None
    eval_tokens = 4 * token_budget if token_budget else None  # no activations kept for backward: ~4x the tokens
    # Loss units per row: 1 per example (classification), loss tokens per row (causal LM); unlabelled rows none. A
    # step's summed loss is divided by its rows' total, so accumulation, processes and packing give the same mean.
    unl_zeros = [0] * (len(train_data) - n_labelled)
    weights = list(spec.units(train_data))[:n_labelled] + unl_zeros
    row_examples = list(spec.examples(train_data))[:n_labelled] + unl_zeros  # packs count their examples
    optimizer = build_optimizer(model, t, layer_scale(plan, cfg.strategy.layer_decay), plan.optimize_frozen)
    # Trainable extras beside the model (distill's hidden projection): the optimizer's last groups, in every checkpoint
    extras = objective.extras().to(acc.device)
    for group in param_groups(extras, t.weight_decay, t.lr):
        optimizer.add_param_group(group)
    extra_params = list(extras.parameters())
    # Lazy embeddings in one process also get row-sparse gradients (DDP keeps dense ones: its reducer is tested so)
    sparse_grads = t.lazy_embeddings and acc.num_processes == 1 and sparse_embedding_gradients(model)
    scheduler = build_schedule(optimizer, t, total_steps)
    model = acc.prepare_model(model)
    raw_model = acc.unwrap_model(model)

    # --- resume: model, optimizer, scheduler, RNG and data position ----------------------------------------
    state = {"epoch": 0, "step_in_epoch": 0, "best": None, "best_step": None, "bad_evals": 0, "bad_steps": 0,
             "skipped_steps": 0, "examples": 0, "tokens": 0, "train_seconds": 0.0, "last_loss": None}
    if unlabelled is not None:
        state["streams"] = {"unlabelled": [0, 0]}  # [epoch, step in epoch] of each stream beyond the labelled one
    step = 0
    ckpts = complete_checkpoints(run_dir) if resume else []
    if ckpts:
        state = load_checkpoint(ckpts[-1], raw_model, optimizer, scheduler, extras)
        step = state.pop("step")
        state.setdefault("bad_steps", 0), state.setdefault("skipped_steps", 0)  # checkpoints older than the guard
        frozen = objective.frozen()
        if state.get("frozen", frozen) != frozen:  # a teacher is never saved: only its fingerprint is
            changed = [k for k in frozen if state["frozen"].get(k) != frozen[k]]
            raise RunDirError(f"--resume {run_dir}: the {', '.join(changed) or 'frozen model'} changed since this "
                              f"run started (objective.{(changed or ['teacher'])[0]}: other weights); resume with the "
                              f"same one, or start a new run")
        if main:
            log(f"resumed from {ckpts[-1]} at step {step}/{total_steps}")
    # Micro-batches per step: train.grad_accum, or what auto_batch_size settled on before the checkpoint.
    accum = state.get("grad_accum", t.grad_accum) if t.auto_batch_size else t.grad_accum

    if main and resume:  # a killed run may have logged steps past its checkpoint: the replay logs them again
        for name in ("metrics.jsonl", "example_ids.jsonl"):
            trim_log(run_dir / name, step)
    metrics_file = open(run_dir / "metrics.jsonl", "a") if main else None
    ids_file = open(run_dir / "example_ids.jsonl", "a") if main and t.log_example_ids else None
    tracker = Tracker(run_dir, cfg, resume_step=step if ckpts else None, enabled=main)

    def write(record: dict) -> None:
        if metrics_file:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            tracker.log(record)

    def evaluate(split: str, encoded) -> dict:
        trim_heap()  # evaluation batches have new shapes: start it on a compact heap, and leave one behind
        try:
            return _evaluate(encoded)
        finally:
            trim_heap()

    def _evaluate(encoded) -> dict:
        return spec.evaluate(raw_model, encoded, batch_size=t.eval_batch_size, pad_id=pad_id, device=acc.device,
                             bf16=bf16, max_tokens=eval_tokens, pad_multiple=multiple)

    def refuse_nonfinite() -> None:
        bad = nonfinite_params(raw_model)
        if bad:
            raise TrainingError(f"step {step}: the weights hold NaN/inf ({bad[0]}" + (f" and {len(bad) - 1} more"
                                if len(bad) > 1 else "") + "), so nothing was saved; lower train.lr or use "
                                f"train.precision=fp32, and resume from the last checkpoint in {run_dir}/checkpoints")

    def checkpoint() -> None:
        # The open log window travels with the checkpoint so a resumed run logs exactly what it would have.
        state["window"] = [float(window_loss), window_examples, window_units, window_seconds]
        state["window_parts"] = {k: float(v) for k, v in window_parts.items()}
        state["grad_accum"] = accum
        state["frozen"] = objective.frozen()
        if main:
            save_checkpoint(run_dir, step, raw_model, optimizer, scheduler, state, t.keep_checkpoints, extras)
        acc.wait_for_everyone()

    def next_unlabelled() -> list[int]:
        """This step's unlabelled rows (as many as a labelled step), advancing the stream's own position."""
        epoch_u, at = state["streams"]["unlabelled"]
        batches_u = step_batches(unlabelled.lengths, step_size, u_seed, epoch_u, t.group_by_length)
        if at >= len(batches_u):  # the stream wraps into its next epoch on its own
            epoch_u, at = epoch_u + 1, 0
            batches_u = step_batches(unlabelled.lengths, step_size, u_seed, epoch_u, t.group_by_length)
        state["streams"]["unlabelled"] = [epoch_u, at + 1]
        return [n_labelled + i for i in batches_u[at]]

    def micro_pass(micro: list[list[int]], units: dict[str, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        step_loss, parts = torch.zeros((), device=acc.device), {}
        for k, idx in enumerate(micro):
            batch = {key: v.to(acc.device) for key, v in spec.collate(train_data, idx, pad_id, multiple).items()}
            sync = k == len(micro) - 1
            with contextlib.nullcontext() if sync else acc.no_sync(model), acc.autocast():
                out = objective(model, batch, idx, units)
            # Sum / step units (x world, undone by DDP's mean): exactly the mean over the step batch.
            acc.backward(out.total * acc.num_processes / units["train"])
            step_loss += out.total.detach().float()
            for name, part in out.parts.items():
                parts[name] = parts.get(name, 0) + part.float()
        return step_loss, parts

    def forward_backward(step_batch: list[int], units: dict[str, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward of one step's micro-batches; its summed loss and loss parts, on the device (no host
        sync).
        Out of memory with train.auto_batch_size: halve the micro-batch, double accumulation, redo the step."""
        nonlocal accum
        rng = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        while True:
            micro = micro_batches(step_batch, lengths, acc.num_processes, acc.process_index, accum,
                                  token_budget)
            try:
                return micro_pass(micro, units)
            except Exception as e:  # noqa: BLE001  (only out-of-memory is handled; the rest re-raises)
                if not is_oom(e):
                    raise
                oom = (str(e).splitlines() or [type(e).__name__])[0]
            # Outside `except`: the traceback, and the activations its frames hold, are gone before freeing.
            optimizer.zero_grad(set_to_none=True)
            free_memory()
            size = max(len(m) for m in micro)  # a token budget may already have cut some: halve the largest
            if not t.auto_batch_size:
                raise TrainingError(f"step {step + 1}: out of memory with a micro-batch of {size} ({oom}); set "
                                    "train.auto_batch_size=true, or lower train.batch_size and raise "
                                    "train.grad_accum (same examples per step)")
            if size <= 1:
                raise TrainingError(f"step {step + 1}: out of memory even with a micro-batch of 1 ({oom}); lower "
                                    "data.max_length, set train.gradient_checkpointing=true, or use a LoRA strategy "
                                    "or a smaller model")
            accum *= 2
            torch.set_rng_state(rng[0])  # the retry draws the same dropout masks as a run set to this size
            if rng[1] is not None:
                torch.cuda.set_rng_state_all(rng[1])
            if main:
                log(f"out of memory at step {step + 1} with a micro-batch of {size}: retrying the step with "
                    f"{-(-size // 2)} (train.grad_accum {accum}, same examples per step)")

    # --- the loop ----------------------------------------------------------------------------------------------
    metric = cfg.best_metric
    model.train()
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not (main and t.progress),
               file=sys.stderr, dynamic_ncols=True)
    # The window's loss stays on the device: no host sync per micro-batch, only when a line is logged.
    window_loss, window_examples, window_units, window_seconds = torch.zeros((), device=acc.device), 0, 0, 0.0
    window_parts: dict[str, torch.Tensor] = {}  # the objective's named loss parts (distill: hard, soft)
    if "window" in state:
        window_loss = torch.tensor(state["window"][0], device=acc.device)
        window_examples, window_units, window_seconds = state["window"][1:]
        window_parts = {k: torch.tensor(v, device=acc.device) for k, v in state.get("window_parts", {}).items()}
    stop, stopped_by = step >= total_steps, None
    trim_heap()  # tokenization and loading garbage
    delay = step_delay_for_tests()
    while not stop:
        epoch = state["epoch"]
        batches = step_batches(lengths[:n_labelled], step_size, t.seed, epoch, t.group_by_length)
        for step_batch in batches[state["step_in_epoch"]:]:
            if delay:
                time.sleep(delay)
            tick = time.perf_counter()
            if plan.on_step:
                plan.on_step(step)
            units = {"train": sum(weights[i] for i in step_batch)}  # loss units of this step, per stream
            rows = step_batch
            if unlabelled is not None:
                extra = next_unlabelled()
                rows, units["unlabelled"] = step_batch + extra, len(extra)
            step_loss, step_parts = forward_backward(rows, units)
            units = units["train"]
            if extra_params and acc.num_processes > 1:  # outside DDP: averaged by hand, as DDP averages the model's
                for p in extra_params:
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad)
                        p.grad /= acc.num_processes
            params = [*model.parameters(), *extra_params]
            if sparse_grads:  # torch's clip refuses sparse gradients; ours takes both (inf: measure only)
                grad_norm = clip_grad_norm(params, t.max_grad_norm or float("inf"), optimizer)
            elif t.max_grad_norm:
                grad_norm = acc.clip_grad_norm_(params, t.max_grad_norm)
            else:
                grad_norm = total_grad_norm(params)
            # The one host sync per step: a non-finite loss or gradient skips the update (weights, optimizer and
            # schedule untouched; the data position still advances); a signal on any process stops after it.
            flags = torch.stack([~torch.isfinite(step_loss), ~torch.isfinite(grad_norm.to(step_loss.device)),
                                 torch.tensor(signals.received is not None, device=step_loss.device)]).float()
            if acc.num_processes > 1:
                torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            bad_loss, bad_grad, signalled = flags.tolist()
            skipped = "non-finite loss" if bad_loss else "non-finite grad" if bad_grad else None
            if skipped is None:
                optimizer.step()
                scheduler.step()
                window_loss += step_loss
                for name, part in step_parts.items():
                    window_parts[name] = window_parts.get(name, 0) + part
                window_units += units
                state["bad_steps"] = 0
            else:
                state["bad_steps"] += 1
                state["skipped_steps"] += 1
            optimizer.zero_grad(set_to_none=True)
            step += 1
            state["step_in_epoch"] += 1
            state["examples"] += sum(row_examples[i] for i in step_batch)
            state["tokens"] += sum(lengths[i] for i in step_batch)
            window_examples += sum(row_examples[i] for i in step_batch)
            if ids_file:
                ids_file.write(json.dumps({"step": step, "ids": step_batch}) + "\n")
                ids_file.flush()
            if skipped:
                write({"step": step, "skipped": skipped})
                if main:
                    bar.write(f"warning: step {step}: {skipped}; skipped it (weights, optimizer and schedule "
                              f"unchanged), {state['bad_steps']} in a row", file=sys.stderr)
                if state["bad_steps"] >= t.max_bad_steps:
                    raise TrainingError(
                        f"step {step}: {skipped} in {state['bad_steps']} steps in a row (train.max_bad_steps), "
                        "none of them applied; lower train.lr, keep train.max_grad_norm set, try "
                        f"train.precision=fp32 or check the data, then resume with --resume {run_dir}")
            state["train_seconds"] += time.perf_counter() - tick
            window_seconds += time.perf_counter() - tick
            bar.update(1)
            epoch_end = state["step_in_epoch"] == len(batches)
            if epoch_end:
                state["epoch"], state["step_in_epoch"] = epoch + 1, 0

            if (step % t.log_every == 0 or step == total_steps) and window_units:
                record = {"step": step, "epoch": round(state["epoch"] + state["step_in_epoch"] / len(batches), 4),
                          "loss": float(window_loss) / max(1, window_units / acc.num_processes),
                          "lr": max(scheduler.get_last_lr()), "examples_per_s": window_examples / window_seconds}
                if t.max_grad_norm:
                    record["grad_norm"] = float(grad_norm)
                for name, part in window_parts.items():  # per-part losses on the loss's scale (torchtune's KD recipe)
                    record[f"loss/{name}"] = float(part) / max(1, window_units / acc.num_processes)
                write(record)
                state["last_loss"] = record["loss"]
                bar.set_postfix(loss=f"{record['loss']:.4f}", ex_s=f"{record['examples_per_s']:.0f}")
                window_loss, window_examples, window_units, window_seconds = window_loss.zero_(), 0, 0, 0.0
                window_parts = {}

            stop = step >= total_steps
            due = (step % t.eval_every == 0) if t.eval_every else epoch_end
            if due or stop:
                refuse_nonfinite()
                if dev_data is not None:
                    scores = evaluate("dev", dev_data)
                    write({"step": step, "split": "dev", **scores})
                    if main:
                        bar.write(f"step {step}: dev " + " ".join(f"{k}={v:.4f}" for k, v in scores.items()),
                                  file=sys.stderr)
                    if is_better(metric, scores[metric], state["best"]):
                        state.update(best=scores[metric], best_step=step, bad_evals=0, best_scores=scores)
                        if main:
                            save_best(run_dir, raw_model, tokenizer, cfg, labels, step, scores)
                    else:
                        state["bad_evals"] += 1
                elif main:
                    save_best(run_dir, raw_model, tokenizer, cfg, labels, step, {})
                checkpoint()
                if on_eval is not None and dev_data is not None and on_eval(step, scores):
                    if main:
                        bar.write(f"stopped at step {step} by the caller (e.g. a pruned tuning trial)", sys.stderr)
                    state["stopped_early"] = True
                    stop = True
                patience = t.early_stopping_patience
                if patience is not None and state["bad_evals"] >= patience:
                    if main:
                        bar.write(f"early stopping: no {metric} improvement in {patience} evaluations", sys.stderr)
                    stop = True
            if signalled and not stop:  # SIGTERM/SIGINT: checkpoint at this step boundary, then return
                if not due:  # (an evaluation step has just saved one)
                    refuse_nonfinite()
                    checkpoint()
                stopped_by, stop = signals.received or "a signal to another process", True
            if stop:
                break
    bar.close()
    if ids_file:
        ids_file.close()
    if stopped_by:
        if main:
            metrics_file.close()
            tracker.close()
            log(f"stopped by {stopped_by} at step {step}/{total_steps}; checkpoint saved. Resume with: "
                f"sftlab train {run_dir / 'config.yaml'} --resume {run_dir}")
        acc.wait_for_everyone()
        return run_dir

    # --- summary: best model on test, throughput, memory -----------------------------------------------------
    summary = {
        "run_dir": str(run_dir), "steps": step, "examples": state["examples"],
        "train_seconds": round(state["train_seconds"], 3),
        "train_examples_per_s": state["examples"] / max(state["train_seconds"], 1e-9),
        "train_tokens": state["tokens"], "train_tokens_per_s": state["tokens"] / max(state["train_seconds"], 1e-9),
        "final_loss": state["last_loss"],
        "trainable_params": sum(p.numel() for p in raw_model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in raw_model.parameters()),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "best_metric": metric, "best_step": state["best_step"], "dev_metrics": state.get("best_scores"),
        "processes": acc.num_processes, "device": str(acc.device), "precision": "bf16" if bf16 else "fp32",
        "data": data.report(cfg.task),
        "grad_accum": accum, "micro_batch_size": -(-step_size // (acc.num_processes * accum)),
        "micro_batch_tokens": token_budget, "pad_to_multiple_of": multiple, "allocator": allocator(),
        "skipped_steps": state["skipped_steps"],
    }
    if torch.cuda.is_available():
        summary["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if "test" in data.encoded:
        from ..eval.evaluate import load_trained

        best_model, _, _ = load_trained(run_dir, device=acc.device)
        raw_model = best_model
        summary["test_metrics"] = evaluate("test", data.encoded["test"])
    if main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        metrics_file.close()
        tracker.close(summary)
        log(f"done: {step} steps in {summary['train_seconds']:.1f}s, {summary['train_examples_per_s']:.1f} examples/s")
        for split in ("dev", "test"):
            if summary.get(f"{split}_metrics"):
                scores = " ".join(f"{k}={v:.4f}" for k, v in summary[f"{split}_metrics"].items())
                log(f"{split} metrics (best model, step {state['best_step']}): {scores}")
    acc.wait_for_everyone()
    return run_dir

