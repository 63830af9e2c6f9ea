"""sftlab vs TRL's SFTTrainer: LoRA instruction tuning of smollm2-135m-instruct, same work, one table of ratios.

    python benchmarks/trl_sft.py [--n-chats 400] [--runs 3] [--only both|all|trl|trl_fp32|sftlab] [--data-dir DATA_DIR]
                                 [--model-dir HF_FOLDER] [--trl-no-gradient-checkpointing]
                                 [--sftlab-gradient-checkpointing] [--sftlab-set KEY=VALUE] [--threads N]
                                 [--json OUT]

Work on both sides: chats built from instructions/alpaca_seed_tasks.jsonl (one chat per instance: user =
instruction + "\\n\\n" + input when there is an input, assistant = output), the first N (the list repeated when
shorter), written once to a temporary `messages` JSONL that both sides read. LoRA r=16, alpha=32, dropout 0.05 on
all linear layers; 1 epoch, batch 8, AdamW lr 2e-4 without weight decay (TRL's default; sftlab's is 0.01),
grad-norm clip 1.0, linear schedule with 3% warmup, max_length 512, seed 0, sequences packed to 512 tokens, loss
logged every 5 steps. Precision: TRL runs with bf16 autocast (its best settings in DESIGN.md) and, with `--only all`,
also in fp32, because which one is faster depends on the CPU (AMX: bf16; AVX-512 BF16 without AMX: fp32); sftlab
runs its default `train.precision: auto` (measures that and picks the faster) and its ratios are taken against the
faster TRL side of the run.

Loss on assistant tokens only, on both sides. SmolLM2's chat template has no `{% generation %}` markers and TRL
1.16 has no training template to swap in for it (`get_training_chat_template` refuses it), so TRL's
`assistant_only_loss=True` cannot be used. The TRL side gets the same chats as prompt/completion text instead, with
`completion_only_loss=True`: prompt = the chat template rendered over the user turn with the generation prompt
(SmolLM2's default system turn included, as the template adds it), completion = assistant content + `<|im_end|>`
(the tokenizer's eos, so TRL appends nothing). That is the rendered chat minus its final "\\n", with loss on the
assistant content and its end-of-turn token. sftlab reads the `messages` file itself and masks to the assistant
turn(s) in its own causal-LM data path.

TRL side, best settings (../shared/DESIGN.md: packing + bf16): SFTConfig(packing=True) -> TRL's default "bfd"
packing, padding-free (no pad tokens; sequences over 512 tokens truncated), bf16=True with use_cpu=True, TRL's other
defaults kept (gradient checkpointing on, unless --trl-no-gradient-checkpointing), no saving, no reporting.
Trained tokens/s = tokens in the packed training set (every one a real token: padding-free) x epochs / train
runtime. sftlab side: `python -m sftlab train - task=causal_lm ...`, figures from RUN_DIR/summary.json, in its own
defaults (no activation checkpointing: each 8 x 512 step runs as ~512-token micro-batches, `train.micro_batch_tokens:
auto`, which bounds the activations instead; --sftlab-gradient-checkpointing turns checkpointing on as on TRL's side).
Peak RSS of each side is its own child process's ru_maxrss (os.wait4); runs are interleaved; medians reported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_peak, median_of, ratio_rows, run_child, training_flops, utilisation_line  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("SFTLAB_DATA_DIR", REPO.parent / "shared" / "data"))
MODEL = "smollm2-135m-instruct"
SEED_TASKS = Path("instructions") / "alpaca_seed_tasks.jsonl"
WORK = dict(epochs=1, batch_size=8, lr=2e-4, weight_decay=0.0, max_grad_norm=1.0, warmup_ratio=0.03, max_length=512, seed=0, log_every=5,
            lora_r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", packing=True)
TRL_SIDES = ("trl", "trl_fp32")


def build_chats(path: Path, n: int) -> list[dict]:
    """First n chats (one per task instance, list repeated if shorter), each {"messages": [user, assistant]}."""
    chats = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            task = json.loads(line)
            for inst in task["instances"]:
                user = task["instruction"] + (f"\n\n{inst['input']}" if inst.get("input") else "")
                chats.append({"messages": [{"role": "user", "content": user},
                                           {"role": "assistant", "content": inst["output"]}]})
    if not chats:
        sys.exit(f"no chats in {path}")
    return [chats[i % len(chats)] for i in range(n)]


def trl_worker(model_dir: Path, chats_path: Path, out: Path, gradient_checkpointing: bool, bf16: bool = True) -> None:
    """Runs inside its own child process, so its peak RSS is this side's alone."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    w = WORK
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    with open(chats_path, encoding="utf-8") as f:
        for line in f:
            msgs = json.loads(line)["messages"]
            # prompt/completion split of the rendered chat (see the module docstring for why not assistant_only_loss)
            prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
            rows.append({"prompt": prompt, "completion": msgs[-1]["content"] + tok.eos_token})
    train_ds = Dataset.from_list(rows)

    set_seed(w["seed"])  # LoRA matrices are initialised when SFTTrainer wraps the model, seed before that
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    peft_config = LoraConfig(r=w["lora_r"], lora_alpha=w["lora_alpha"], lora_dropout=w["lora_dropout"],
                             target_modules=w["target_modules"], task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(
            output_dir=tmp, num_train_epochs=w["epochs"], per_device_train_batch_size=w["batch_size"],
            learning_rate=w["lr"], weight_decay=w["weight_decay"], max_grad_norm=w["max_grad_norm"],
            lr_scheduler_type="linear",
            warmup_steps=w["warmup_ratio"],  # transformers 5: a float < 1 is a fraction of the steps
            seed=w["seed"], max_length=w["max_length"], packing=True,  # "bfd": padding-free, no pad tokens
            completion_only_loss=True,
            bf16=bf16, use_cpu=True,  # bf16 autocast on CPU; without use_cpu, bf16=True is rejected here
            gradient_checkpointing=gradient_checkpointing,
            logging_strategy="steps", logging_steps=w["log_every"], save_strategy="no", eval_strategy="no",
            report_to="none", disable_tqdm=True)
        trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tok,
                             peft_config=peft_config)
        packed = trainer.train_dataset
        tokens = sum(len(ids) for ids in packed["input_ids"]) * w["epochs"]
        loss_tokens = sum(sum(t != -100 for t in lab) for lab in packed["labels"]) * w["epochs"]
        metrics = trainer.train().metrics
        logs = trainer.state.log_history
    losses = [h["loss"] for h in logs if "loss" in h]
    seen = [h["num_tokens"] for h in logs if "num_tokens" in h]
    out.write_text(json.dumps({
        "tokens_per_s": tokens / metrics["train_runtime"], "train_seconds": metrics["train_runtime"],
        "final_loss": losses[-1] if losses else metrics.get("train_loss"), "train_tokens": tokens,
        "loss_tokens": loss_tokens, "n_packed_rows": len(packed), "steps": trainer.state.global_step,
        "trl_num_tokens_logged": seen[-1] if seen else None, "mean_train_loss": metrics.get("train_loss")}))


def child_env(args: argparse.Namespace) -> dict[str, str]:
    # Same environment for both sides: torch's default (all cores) thread count, made explicit so that
    # neither side's libraries pick a different one; tokenizers' own thread pool off, no hub access.
    # PYTHONPATH lets the benchmark run from a checkout where sftlab is not pip-installed yet.
    threads = str(args.threads or os.cpu_count() or 1)
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}


def resolve_model_dir(args: argparse.Namespace) -> Path:
    """The HF folder sftlab converts the packaged GGUF into (cached), made once here, before any timed child,
    so that neither side pays the conversion or carries its fp32 de-quantisation in its peak RSS."""
    code = f"from sftlab.models.packaged import decoder_path; print(decoder_path({MODEL!r}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(args), text=True,
                          stdout=subprocess.PIPE)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        sys.exit(f"could not resolve {MODEL} via sftlab.models.packaged.decoder_path (exit {proc.returncode}); "
                 "pass --model-dir HF_FOLDER to run the TRL side alone")
    return Path(lines[-1].strip())


def run_side(side: str, args: argparse.Namespace, tmp: Path, chats_path: Path, i: int) -> dict:
    env = child_env(args)
    if side in TRL_SIDES:
        out = tmp / f"{side}-{i}.json"
        cmd = [sys.executable, __file__, "--_worker", side, "--_out", str(out), "--_chats", str(chats_path),
               "--model-dir", str(args.model_dir)]
        if args.trl_no_gradient_checkpointing:
            cmd.append("--trl-no-gradient-checkpointing")
        rc, _, rss = run_child(cmd, env, capture=False)
        if rc != 0:
            sys.exit(f"TRL worker failed (exit {rc})")
        result = json.loads(out.read_text())
    else:
        w = WORK
        cmd = [sys.executable, "-m", "sftlab", "train", "-", "task=causal_lm", f"model.name={MODEL}",
               f"data.train={chats_path}", "data.format=messages", f"data.max_length={w['max_length']}",
               f"data.packing={str(w['packing']).lower()}", "strategy.name=lora", f"strategy.r={w['lora_r']}",
               f"strategy.alpha={w['lora_alpha']}", f"strategy.dropout={w['lora_dropout']}",
               f"strategy.target_modules={w['target_modules']}", f"train.epochs={w['epochs']}",
               f"train.batch_size={w['batch_size']}", f"train.lr={w['lr']}", f"train.weight_decay={w['weight_decay']}",
               f"train.max_grad_norm={w['max_grad_norm']}", f"train.warmup_ratio={w['warmup_ratio']}",
               f"train.seed={w['seed']}", f"train.log_every={w['log_every']}",
               "train.progress=false", f"output_dir={tmp / f'sftlab-run-{i}'}",
               f"train.gradient_checkpointing={str(args.sftlab_gradient_checkpointing).lower()}",
               *args.sftlab_set]
        rc, stdout, rss = run_child(cmd, env, capture=True)
        lines = stdout.strip().splitlines()
        if rc != 0 or not lines:
            sys.exit(f"sftlab failed (exit {rc}): {' '.join(cmd)}")
        summary = json.loads((Path(lines[-1].strip()) / "summary.json").read_text())
        result = {"tokens_per_s": summary["train_tokens_per_s"], "train_seconds": summary["train_seconds"],
                  "final_loss": summary["final_loss"], "train_tokens": summary["train_tokens"],
                  "self_peak_rss_mb": summary.get("peak_rss_mb"), "precision": summary.get("precision")}
    return {"tool": side, "run": i, **result, "peak_rss_mb": rss}


KEYS = ("tokens_per_s", "train_seconds", "peak_rss_mb", "final_loss", "train_tokens")

def report(runs: list[dict], args: argparse.Namespace) -> dict:
    med = {t: m for t in (*TRL_SIDES, "sftlab") if (m := median_of(runs, t, KEYS))}
    gc = "off" if args.trl_no_gradient_checkpointing else "on"
    sgc = "on" if args.sftlab_gradient_checkpointing else "off"
    precision = "/".join(sorted({r["precision"] for r in runs if r.get("precision")})) or "?"
    names = {"trl": f"TRL SFTTrainer (packing + bf16, grad. ckpt {gc})",
             "trl_fp32": f"TRL SFTTrainer (packing, fp32, grad. ckpt {gc})",
             "sftlab": f"sftlab (grad. ckpt {sgc}) [precision {precision}]"}
    print(f"\n{MODEL}, LoRA r={WORK['lora_r']} all-linear, {args.n_chats} chats x 1 epoch, batch {WORK['batch_size']}, "
          f"max_length {WORK['max_length']}; medians of {args.runs} run(s)")
    print(f"matmul peaks measured here: fp32 {args.peaks['float32']:.0f}, bf16 {args.peaks['bfloat16']:.0f} GFLOP/s; "
          f"model FLOPs per trained token: "
          f"{args.flops_per_token / 1e6:.0f} MFLOP (6 x non-embedding params + attention)\n")
    print("| tool | tokens/s | train s | peak RSS MB | final loss | trained tokens | model FLOP/s (% of the faster peak) |\n"
          "|---|---:|---:|---:|---:|---:|---|")
    for t, m in med.items():
        util = utilisation_line(args.flops_per_token * m["tokens_per_s"], 1.0, args.peak, args.peak_dtype)
        print(f"| {names[t]} | {m['tokens_per_s']:.1f} | {m['train_seconds']:.1f} | {m['peak_rss_mb']:.0f} | "
              f"{m['final_loss']:.4f} | {m['train_tokens']:.0f} | {util} |")
    ratios = ratio_rows(med, {"trl": "TRL bf16", "trl_fp32": "TRL fp32"}, "tokens_per_s", "final_loss", 2)
    print("\nper run:\n| tool | run | tokens/s | train s | peak RSS MB | final loss | trained tokens |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        print(f"| {r['tool']} | {r['run']} | {r['tokens_per_s']:.1f} | {r['train_seconds']:.1f} | "
              f"{r['peak_rss_mb']:.0f} | {r['final_loss']:.4f} | {r['train_tokens']} |")
    return {"work": {**WORK, "n_chats": args.n_chats, "model": MODEL, "trl_gradient_checkpointing": gc == "on"},
            "matmul_peaks": args.peaks,
            "runs": runs, "medians": med, "ratios_sftlab_over_trl": ratios}


def flops_per_token(model_dir: Path, chats_path: Path) -> float:
    """Model FLOPs per trained token over these chats: 6 x non-embedding parameters plus attention within each
    example (packing is block-diagonal), lengths as rendered by the chat template, cut at max_length."""
    from transformers import AutoConfig, AutoTokenizer

    cfg, tok = AutoConfig.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    lengths = []
    with open(chats_path, encoding="utf-8") as f:
        for line in f:
            enc = tok.apply_chat_template(json.loads(line)["messages"], tokenize=True)
            ids = enc["input_ids"] if hasattr(enc, "keys") else enc
            lengths.append(min(len(ids), WORK["max_length"]))
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * h // cfg.num_attention_heads
    nonembedding = L * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h  # q,o + k,v + gate,up,down + 2 norms; final norm
    return training_flops(nonembedding, L, h, lengths) / sum(lengths)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-chats", type=int, default=400)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--only", choices=("both", "all", *TRL_SIDES, "sftlab"), default="both",
                   help="both: TRL bf16 and sftlab; all: TRL bf16, TRL fp32 and sftlab")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="default: $SFTLAB_DATA_DIR or ../shared/data")
    p.add_argument("--model-dir", type=Path, default=None,
                   help=f"HF folder for the TRL side (default: sftlab's cached conversion of {MODEL})")
    p.add_argument("--trl-no-gradient-checkpointing", action="store_true",
                   help="turn off TRL's default gradient checkpointing (faster, more memory)")
    p.add_argument("--sftlab-gradient-checkpointing", action="store_true",
                   help="sftlab side with activation checkpointing (off by default, as sftlab's default is)")
    p.add_argument("--sftlab-set", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra override for the sftlab side (repeatable), e.g. train.micro_batch_tokens=1024")
    p.add_argument("--threads", type=int, default=None, help="threads for both sides (default: all cores)")
    p.add_argument("--json", type=Path, default=None, help="also write runs, medians and ratios here")
    p.add_argument("--_worker", choices=TRL_SIDES, help=argparse.SUPPRESS)
    p.add_argument("--_out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--_chats", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._worker:
        return trl_worker(args.model_dir, args._chats, args._out, not args.trl_no_gradient_checkpointing,
                          bf16=args._worker == "trl")
    seed_tasks = args.data_dir.resolve() / SEED_TASKS
    if not seed_tasks.is_file():
        sys.exit(f"no {SEED_TASKS} under {args.data_dir}; pass --data-dir or set SFTLAB_DATA_DIR")

    sides = {"both": ["trl", "sftlab"], "all": [*TRL_SIDES, "sftlab"]}.get(args.only, [args.only])
    # Warms sftlab's model cache too, so that the sftlab side does not convert the GGUF inside a timed child.
    model_dir = resolve_model_dir(args) if "sftlab" in sides or not args.model_dir else None
    args.model_dir = args.model_dir.resolve() if args.model_dir else model_dir
    runs = []
    args.peak, args.peak_dtype, args.peaks = machine_peak()
    with tempfile.TemporaryDirectory(prefix="sftlab-bench-") as tmp:
        chats_path = Path(tmp) / "chats.jsonl"  # outside the repo: data is never copied into it
        with open(chats_path, "w", encoding="utf-8") as f:
            for chat in build_chats(seed_tasks, args.n_chats):
                f.write(json.dumps(chat) + "\n")
        args.flops_per_token = flops_per_token(args.model_dir, chats_path)
        for i in range(args.runs):  # interleaved, so drift in machine speed hits both sides alike
            for side in sides:
                print(f"[bench] run {i + 1}/{args.runs}: {side}", file=sys.stderr, flush=True)
                runs.append(run_side(side, args, Path(tmp), chats_path, i + 1))
    result = report(runs, args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
