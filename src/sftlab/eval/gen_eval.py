"""Generation-based evaluation of decoders: what the model *says*, scored against the reference answer.

Works on a fine-tuned run or on a base model before any fine-tuning, optionally with K-shot in-context
examples from the training set, so zero-shot, K-shot ICL and SFT are measured on the same metric.
"""
from __future__ import annotations

import json
import time
import sys
from pathlib import Path

import torch
import yaml

from ..config import DataConfig
from ..data.chat import ChatRenderer, rows_to_conversations
from ..data.columns import to_prompt_completion
from ..data.examples import resolve_path
from ..data.read import read_table
from ..errors import ConfigError
from .evaluate import analysis_path, write_json
from .gen_metrics import generation_metrics, label_accuracy, worst_examples
from .generate import generate
from .icl import build_icl_messages, select_shots


def load_generator(target: str, device=None):
    """(model, tokenizer, meta) for a run dir / its best folder, or a base model name or folder."""
    from ..artifacts import ModelDir
    from .evaluate import load_trained

    md = ModelDir.open(target)
    if md.trained:
        model, tokenizer, meta = load_trained(target, device=device)
        if meta["task"] != "causal_lm":
            raise ConfigError(f"{target}: a {meta['task']} model, not a decoder; generation needs a causal_lm run "
                              f"(use `sftlab predict {target} --data FILE` for this one)")
        return model, tokenizer, meta
    from transformers import AutoModelForCausalLM

    from ..models import load_tokenizer, resolve_model
    from .evaluate import default_device, loading

    meta = {"task": "causal_lm", "template": None, "system_prompt": None}
    if md.kind == "export":  # an `sftlab export` folder of a decoder: its template and system prompt
        meta |= {k: v for k, v in md.meta.items() if k in meta}
        if meta["task"] != "causal_lm":
            raise ConfigError(f"{target}: a {meta['task']} export, not a decoder; generation needs a causal_lm model "
                              f"(use `sftlab predict {target} --data FILE` for this one)")
    path = resolve_model(target)
    with loading(Path(path)):
        try:
            model = AutoModelForCausalLM.from_pretrained(path)
        except ValueError as e:  # an encoder's config: "Unrecognized configuration class ... for AutoModelForCausalLM"
            raise ConfigError(f"{target}: not a causal LM ({str(e).splitlines()[0][:160]}); generation needs a "
                              f"decoder") from None
    model.to(device or default_device()).eval()
    return model, load_tokenizer(target), meta


def data_config(target: str, config: str | None) -> DataConfig:
    """Data layout from --config, else from the run's own config.yaml."""
    for cand in ([Path(config)] if config else [Path(target) / "config.yaml", Path(target).parent / "config.yaml"]):
        if cand.is_file():
            raw = yaml.safe_load(cand.read_text()) or {}
            return DataConfig(**(raw.get("data") or {}))
    if config:
        raise ConfigError(f"--config {config}: file not found")
    return DataConfig()


def conversations(dcfg: DataConfig, path: str, limit: int | None = None):
    table = read_table(resolve_path(dcfg, path), header=True, skip_invalid=dcfg.skip_invalid)
    if dcfg.prompt is not None:
        table = to_prompt_completion(table, dcfg)
        dcfg = dcfg.model_copy(update={"format": "prompt_completion"})
    convs, _ = rows_to_conversations(table, dcfg)
    return convs[:limit] if limit else convs


def reference_perplexity(model, tokenizer, convs, dcfg: DataConfig, template, batch_size: int, bf16: bool) -> dict:
    from ..data.chat import encode_conversations
    from ..data.lm import build
    from .infer import lm_scores

    ids, masks, counts = encode_conversations(tokenizer, convs, dcfg.model_copy(update={"template": template}))
    scores = lm_scores(model, build(ids, masks, counts), batch_size=batch_size, pad_id=tokenizer.pad_token_id or 0,
                       device=model.device, bf16=bf16)
    return {"ref_loss": scores["loss"], "ref_perplexity": scores["perplexity"]}


def evaluate_generation(target: str, data: str, *, config: str | None = None, icl_shots: int = 0,
                        labels: list[str] | None = None, max_new_tokens: int = 64, batch_size: int = 16,
                        limit: int | None = None, seed: int = 0, out: str | None = None, bf16: bool = True,
                        analysis: bool = True) -> dict:
    model, tokenizer, meta = load_generator(target)
    dcfg = data_config(target, config)
    template = dcfg.template or meta.get("template")
    convs = conversations(dcfg, data, limit)
    shots_pool = []
    if icl_shots:
        if not dcfg.train:
            raise ConfigError("--icl-shots needs data.train (from --config or the run's config) to draw shots from")
        shots_pool = [{"prompt": c.messages[-2]["content"], "label": c.messages[-1]["content"]}
                      for c in conversations(dcfg, dcfg.train, dcfg.limit_train)]
    prompts, prompt_tokens, refs = [], [], []
    renderer = ChatRenderer(tokenizer, template)
    for i, conv in enumerate(convs):
        history = conv.messages[:-1]
        if icl_shots:
            shots = select_shots(shots_pool, icl_shots, seed=seed * 1_000_003 + i,
                                 label_key="label" if labels else None)
            query = history[-1]["content"]
            system = [m for m in history if m["role"] == "system"]
            history = build_icl_messages([(s["prompt"], s["label"]) for s in shots], query,
                                         system=system[0]["content"] if system else None)
        text, ids = renderer.prompt_ids(history)
        prompts.append(text)
        prompt_tokens.append(ids)
        refs.append(conv.messages[-1]["content"])
    stop = [tokenizer.eos_token] if tokenizer.eos_token else None
    t0 = time.perf_counter()
    preds = generate(model, tokenizer, prompt_tokens, max_new_tokens=max_new_tokens, stop=stop, batch_size=batch_size,
                     bf16=bf16, progress=True, seed=seed, device=model.device)
    seconds = time.perf_counter() - t0
    scores = generation_metrics(preds, refs, labels=labels)
    # Speed as a user sees it: the outputs' tokens (re-tokenized) per second of the whole batched generation.
    new_tokens = sum(len(tokenizer(p, add_special_tokens=False).input_ids) for p in preds)
    scores |= {"params": sum(p.numel() for p in model.parameters()), "gen_tokens_per_s": new_tokens / max(seconds,
                                                                                                         1e-9)}
    if not icl_shots:  # perplexity of the reference answers under the model (same prompts, no shots)
        scores |= reference_perplexity(model, tokenizer, convs, dcfg, template, batch_size, bf16)
    scores |= {"examples": len(convs), "icl_shots": icl_shots}
    parsed = label_accuracy(preds, refs, labels)[1] if labels else [None] * len(preds)
    target_file = analysis_path(target, data) if analysis else None
    if target_file and not icl_shots:  # error analysis of the fine-tuned run, kept in its run directory
        per = [{"prompt": p, "reference": r, "output": o, "parsed": lab}
               for p, r, o, lab in zip(prompts, refs, preds, parsed)]
        worst = [per[w["index"]] | {"rouge_l": w["rouge_l"]} for w in worst_examples(preds, refs, 20)]
        write_json(target_file, {"task": "causal_lm", "data": str(data), "metrics": scores, "examples": len(per),
                                 "outputs": per, "worst": worst})
        print(f"error analysis: {target_file}", file=sys.stderr)
    if out:
        with open(out, "x", encoding="utf-8") as f:
            for prompt, ref, pred, lab in zip(prompts, refs, preds, parsed):
                f.write(json.dumps({"prompt": prompt, "reference": ref, "output": pred, "parsed": lab},
                                   ensure_ascii=False) + "\n")
    return scores
