"""Masked LM: continued pre-training of an encoder on raw text (BERT's objective, Devlin et al. 2019).

A fraction `data.mlm_probability` (0.15) of the non-special tokens is chosen; of those 80% become the mask token,
10% a random token and 10% stay as they are, and the loss is cross-entropy at the chosen positions only (one loss
unit per chosen token). `data.whole_word_mask` chooses words instead and masks every piece of a chosen word (the
wwm release of BERT; Cui et al. 2019), so a model cannot recover "##ing" from "runn".

Pitfalls handled: masks are drawn again every epoch (dynamic masking: RoBERTa, Liu et al. 2019, found static masks
no better and they repeat) as a pure function of (seed, epoch, row), never of the micro-batch, the process or the
position on resume, so "batch 8 x accum 1 == batch 2 x accum 4", "2 processes == 1" and "resume == uninterrupted"
hold for MLM too. Since the number of chosen tokens of a row changes per epoch, the loop asks `step_units` for
each step's count. Only the chosen positions go through the vocabulary projection (30,522 columns for minilm-l6:
8 x 128 x 30k logits would cost more than the encoder). Dev perplexity uses the epoch-0 masks of the dev rows
(seeded), so every evaluation scores the same positions.

The packaged `minilm-l6` (sentence-transformers) ships no MLM head: `after_load` builds it as BERT's (dense +
GELU + LayerNorm transform, decoder tied to the word embeddings) starting as the unigram model of the training
text (`after_load`: why, and the measured start). It also carries the base model's pooler (BertForMaskedLM drops it)
through unchanged, so a classifier started from the result (`model.name: RUN_DIR/best`) gets the original pooler.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from ..data.batches import Encoded, padded_width
from ..registry import tasks
from . import TaskSpec


@dataclass
class MaskedEncoded(Encoded):
    """Encoded text rows plus what masking needs (labels are None)."""
    seed: int = 0
    probability: float = 0.15
    mask_id: int = 0
    vocab_size: int = 0
    specials: tuple = ()
    word_ids: list[list[int]] | None = None  # per token its word's index in the row (-1 special): whole-word masking


def draw(data: MaskedEncoded, row: int, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(chosen positions, the token each shows the model, its original token) for one row: a pure function of
    (data.seed, epoch, row)."""
    ids = np.asarray(data.input_ids[row])
    rng = np.random.default_rng((data.seed, epoch, row))
    if data.word_ids is None:
        cand = np.flatnonzero(~np.isin(ids, data.specials))
        chosen = cand[rng.random(len(cand)) < data.probability]
    else:
        words = np.asarray(data.word_ids[row])
        n_words = int(words.max()) + 1 if len(words) else 0
        picked = rng.random(n_words) < data.probability
        chosen = np.flatnonzero((words >= 0) & picked[np.maximum(words, 0)]) if n_words else words[:0]
    fate = rng.random(len(chosen))
    shown = ids[chosen].copy()
    shown[fate < 0.8] = data.mask_id
    swap = (fate >= 0.8) & (fate < 0.9)
    shown[swap] = rng.integers(0, data.vocab_size, int(swap.sum()))
    return chosen, shown, ids[chosen]


def step_units(data: MaskedEncoded, rows: list[int], epoch: int) -> int:
    return sum(len(draw(data, i, epoch)[0]) for i in rows)


def collate(data: MaskedEncoded, rows: list[int], pad_id: int, multiple: int = 1, epoch: int = 0) -> dict:
    """Dynamic padding; `labels` holds the original token at chosen positions and -100 elsewhere."""
    width = padded_width(max(len(data.input_ids[i]) for i in rows), multiple)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    types = torch.zeros((len(rows), width), dtype=torch.long) if data.token_type_ids is not None else None
    for r, i in enumerate(rows):
        n = len(data.input_ids[i])
        row = np.asarray(data.input_ids[i])
        pos, shown, orig = draw(data, i, epoch)
        row[pos] = shown
        ids[r, :n] = torch.from_numpy(row)
        labels[r, pos] = torch.from_numpy(orig)
        mask[r, :n] = 1
        if types is not None:
            types[r, :n] = torch.tensor(data.token_type_ids[i])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if types is not None:
        batch["token_type_ids"] = types
    return batch


def _head_parts(model):
    """(encoder, head) of an HF masked LM whose head is its one child besides the encoder (BERT's `cls`, RoBERTa's
    and MPNet's `lm_head`); None when the layout differs (the full forward is used)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # under PEFT
    base = getattr(inner, "base_model_prefix", None)
    encoder = getattr(inner, base, None) if base else None
    heads = [m for name, m in inner.named_children() if name != base]
    return (encoder, heads[0]) if encoder is not None and len(heads) == 1 else None


def masked_lm_loss(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy over chosen positions, their logits [chosen, vocab] in row-major order)."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    keep = labels != -100
    parts = None if isinstance(model, DistributedDataParallel) else _head_parts(model)  # DDP syncs via its forward
    prompt_learning = getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False)
    if parts is None or prompt_learning:
        logits = model(**inputs).logits[:, -labels.shape[1]:][keep]
    else:
        encoder, head = parts
        hidden = encoder(**inputs).last_hidden_state
        logits = head(hidden[keep])
    return F.cross_entropy(logits.float(), labels[keep], reduction="sum"), logits


@torch.no_grad()
def evaluate(model, data, *, batch_size, pad_id, device, bf16, max_tokens=None, pad_multiple=1) -> dict:
    """Mean cross-entropy per chosen token of the dev rows (their epoch-0 masks) and its perplexity."""
    import contextlib

    from ..data.batches import eval_batches

    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    for idx in eval_batches(data.lengths, batch_size, max_tokens):
        batch = {k: v.to(device) for k, v in collate(data, idx, pad_id, pad_multiple).items()}
        if not bool((batch["labels"] != -100).any()):
            continue
        with autocast:
            loss, _ = masked_lm_loss(model, batch)
        total += float(loss)
        tokens += int((batch["labels"] != -100).sum())
    model.train(was_training)
    mean = total / max(tokens, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "masked_tokens": tokens}


def after_load(model, folder: str, missing: set, data: MaskedEncoded | None = None, labels=None) -> None:
    """A head the checkpoint lacked starts from the training text's unigram model: transform = identity (LayerNorm
    as usual), output bias = log add-one token frequencies of `data`. Measured on minilm-l6, kitchen reviews dev
    (300 rows, docs/continued-pretraining.md): transformers' random head starts at perplexity 50,047, an identity
    transform with zero bias 47,933 (uniform would be 30,522: the sentence-embedding states are far from the word
    embeddings), this start 1,167. A LayerNorm weight of 0 (the head then outputs its bias alone: 698) looked
    better at step 0 but does not learn: Adam moves a zero scale by ~lr a step, so after 40 steps at lr 5e-5 dev
    perplexity was still 690, against 419 with this start (133 at lr 5e-4). The pooler is carried (_KeptPooler)."""
    parts = _head_parts(model)
    if parts is None:
        return
    encoder, head = parts
    if any(k.split(".")[0] != getattr(model, "base_model_prefix", "") for k in missing):
        vocab = model.config.vocab_size
        prior = torch.zeros(vocab)
        if data is not None and len(data):
            counts = np.bincount(np.concatenate([np.asarray(x) for x in data.input_ids]), minlength=vocab)[:vocab]
            prior = torch.from_numpy(np.log((counts + 1) / (counts.sum() + vocab))).float()
        with torch.no_grad():
            for module in head.modules():
                if isinstance(module, torch.nn.Linear) and module.weight.shape[0] == module.weight.shape[1]:
                    module.weight.copy_(torch.eye(module.weight.shape[0]))
                    if module.bias is not None:
                        module.bias.zero_()
                elif isinstance(module, torch.nn.LayerNorm):
                    module.reset_parameters()
            for p in head.parameters():
                if p.dim() == 1 and p.shape[0] == vocab:  # the output bias (BERT ties cls.predictions.bias to it)
                    p.copy_(prior.to(p.dtype))
    _keep_pooler(encoder, folder)


class _KeptPooler(torch.nn.Module):
    """The checkpoint's pooler carried through MLM training as buffers (saved as `<base>.pooler.dense.*`, never
    trained, never a parameter DDP or a strategy would see): the MLM loss does not read it, so forward skips it."""

    def __init__(self, tensors: dict):
        super().__init__()
        self.dense = torch.nn.Module()
        for name, t in tensors.items():
            self.dense.register_buffer(name, t)

    def forward(self, hidden_states):
        return None


def _keep_pooler(encoder, folder: str) -> None:
    from pathlib import Path

    if getattr(encoder, "pooler", 1) is not None:
        return
    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        return
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        tensors = {k.rsplit(".", 1)[1]: f.get_tensor(k) for k in f.keys()
                   if f".{k}".endswith((".pooler.dense.weight", ".pooler.dense.bias"))}
    if set(tensors) == {"weight", "bias"}:
        encoder.pooler = _KeptPooler(tensors)


tasks.register("masked_lm")(TaskSpec(
    "masked_lm", decoder=False, head_kwargs=lambda labels: {}, loss=masked_lm_loss, collate=collate,
    units=lambda data: [0] * len(data), examples=lambda data: [1] * len(data), evaluate=evaluate,
    metrics={"perplexity": False, "loss": False}, auto="AutoModelForMaskedLM", head_reads_first_token=False,
    step_units=step_units, after_load=after_load))
