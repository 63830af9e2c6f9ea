"""Tokenize once, then batch: dynamic padding, seeded length-grouped order, resumable by step index.

A *step batch* holds every example of one optimizer step across processes and accumulation
(batch_size x grad_accum x world). It is split into micro-batches of similar length, rank r taking
chunks r, r + world, ... So the same seed gives the same step batches whatever the split, which is what
makes "batch 8 x accum 1 == batch 2 x accum 4" and "2 processes == 1" hold.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .examples import Example


@dataclass
class Encoded:
    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: list[int | float | None]
    truncated: int  # examples longer than max_length before truncation
    raw_lengths: list[int] | None = None  # tokens before truncation (of the first char_cap characters of a text)
    capped: int = 0  # texts longer than char_cap characters: their raw length is a lower bound

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.input_ids]


def char_cap(max_length: int) -> int:
    """Characters of one text worth tokenizing: far more than max_length tokens ever span, so truncation keeps the
    same tokens; a 50 MB row costs milliseconds instead of minutes (issue 15: 106 s in `data check`)."""
    return max(4096, 64 * max_length)


def encode(tokenizer, examples: list[Example], max_length: int) -> Encoded:
    cap = char_cap(max_length)
    texts = [e.text[:cap] for e in examples]
    pairs = [e.text_pair[:cap] for e in examples] if examples and examples[0].text_pair is not None else None
    # One pass without truncation measures true lengths; only the over-long rows are encoded again.
    ids, types = tokenize(tokenizer, texts, pairs)
    raw = [len(x) for x in ids]
    long_rows = [i for i, x in enumerate(ids) if len(x) > max_length]
    if long_rows:
        cut = tokenizer(
            [texts[i] for i in long_rows],
            [pairs[i] for i in long_rows] if pairs else None,
            truncation=True,
            max_length=max_length,
        )
        for j, i in enumerate(long_rows):
            ids[i] = cut["input_ids"][j]
            if types is not None:
                types[i] = cut["token_type_ids"][j]
    capped = sum(len(e.text) > cap or (e.text_pair is not None and len(e.text_pair) > cap) for e in examples)
    return Encoded(ids, types, [e.label for e in examples], len(long_rows), raw, capped)


def tokenize(tokenizer, texts: list[str], pairs: list[str] | None) -> tuple[list[list[int]], list[list[int]] | None]:
    """(input_ids, token_type_ids or None) of every text (and pair), untruncated, as `tokenizer(texts, pairs)` gives
    them. A fast tokenizer's Rust backend is called directly, on every core: transformers' per-row conversion to
    Python dicts cost more than the tokenizing (issue 22: full SST-2, 67k rows, 2.3 s -> ~1 s on 2 cores; the ids
    are the same, tests/unit/test_tokenize.py). TOKENIZERS_PARALLELISM is on for this call only: off elsewhere
    (cli.py), since a process that forks after a parallel call gets the tokenizers library's warning."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast") or getattr(tokenizer, "split_special_tokens", False):
        enc = tokenizer(texts, pairs, truncation=False, verbose=False)
        return enc["input_ids"], enc.get("token_type_ids")
    backend.no_truncation()  # (transformers sets both before each of its own calls too)
    backend.no_padding()
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        encodings = backend.encode_batch_fast(list(zip(texts, pairs)) if pairs is not None else texts,
                                              add_special_tokens=True)
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before
    ids = [e.ids for e in encodings]
    types = [e.type_ids for e in encodings] if "token_type_ids" in tokenizer.model_input_names else None
    return ids, types


def join(labelled: Encoded, unlabelled: Encoded, ignore: int | float = -100) -> Encoded:
    """One row space for two streams: the unlabelled rows follow the labelled ones (row ids len(labelled)...) with
    label `ignore` (cross-entropy skips -100, the regression loss NaN), so a micro-batch mixing both runs as one
    forward and one backward."""
    types = (labelled.token_type_ids + unlabelled.token_type_ids
             if labelled.token_type_ids is not None and unlabelled.token_type_ids is not None else None)
    return Encoded(labelled.input_ids + unlabelled.input_ids, types,
                   list(labelled.labels) + [ignore] * len(unlabelled), labelled.truncated + unlabelled.truncated)


def collate(data: Encoded, indices: list[int], pad_id: int, regression: bool, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence in this batch (dynamic padding), rounded up to `multiple`."""
    width = padded_width(max(len(data.input_ids[i]) for i in indices), multiple)
    ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    types = torch.zeros((len(indices), width), dtype=torch.long) if data.token_type_ids is not None else None
    for row, i in enumerate(indices):
        n = len(data.input_ids[i])
        ids[row, :n] = torch.tensor(data.input_ids[i])
        mask[row, :n] = 1
        if types is not None:
            types[row, :n] = torch.tensor(data.token_type_ids[i])
    batch = {"input_ids": ids, "attention_mask": mask}
    if types is not None:
        batch["token_type_ids"] = types
    if data.labels and data.labels[indices[0]] is not None:
        dtype = torch.float32 if regression else torch.long
        batch["labels"] = torch.tensor([data.labels[i] for i in indices], dtype=dtype)
    return batch


def padded_width(longest: int, multiple: int) -> int:
    return -(-longest // multiple) * multiple


def step_batches(lengths: list[int], step_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """The epoch's step batches, a pure function of (seed, epoch): resume just skips the first k."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    if not group_by_length:
        return [order[i : i + step_size] for i in range(0, len(order), step_size)]
    # HF-style megabatches: sort 50 step batches' worth by length, cut, then shuffle the batches.
    mega = step_size * 50
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])
        batches += [chunk[i : i + step_size] for i in range(0, len(chunk), step_size)]
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[p] for p in perm]


def micro_batches(step: list[int], lengths: list[int], world: int, rank: int, accum: int,
                  max_tokens: int | None = None) -> list[list[int]]:
    """This rank's micro-batches of one step batch (similar lengths together; may be fewer than accum).
    `max_tokens`: a micro-batch whose padded size (rows x longest row) would exceed it is cut into equal pieces, so
    that a few long examples do not set the run's peak activation memory; the step's loss and gradient are the
    same sums either way (the loop divides by the step's units)."""
    ordered = sorted(step, key=lambda i: -lengths[i])
    parts = world * accum
    size = -(-len(ordered) // parts)
    chunks = [c for c in [ordered[k * size : (k + 1) * size] for k in range(parts)][rank::world] if c]
    if not max_tokens:
        return chunks
    out = []
    for chunk in chunks:  # longest first: the first row sets the padded width of the chunk and of its first piece
        # The fewest equal pieces that fit the budget (a piece may exceed it by less than one row): equal sizes keep
        # the set of batch shapes small, and bf16 CPU matmuls cache a kernel per shape (config pad_to_multiple_of).
        pieces = -(-len(chunk) * max(1, lengths[chunk[0]]) // max_tokens)
        size = -(-len(chunk) // pieces)
        out += [chunk[k : k + size] for k in range(0, len(chunk), size)]
    return out


def paired_micro_batches(step: list[int], extra: list[int], lengths: list[int], world: int, rank: int, accum: int,
                         max_tokens: int | None = None) -> list[list[int]]:
    """micro_batches of a step that also holds a second stream's rows (`extra`): each stream is cut alone and piece
    k of one joins piece k of the other, so every micro-batch holds both streams in the step's proportion. Objectives
    that compare the streams within a micro-batch (MMD, a domain classifier) then never see one side alone, however
    accumulation, processes or a token budget split the step."""
    parts = world * accum

    def cut(rows: list[int], n: int) -> list[list[int]]:  # n pieces, longest first, sizes within one of each other
        ordered = sorted(rows, key=lambda i: -lengths[i])
        return [ordered[k * len(ordered) // n: (k + 1) * len(ordered) // n] for k in range(n)]

    pairs = [(a, b) for a, b in list(zip(cut(step, parts), cut(extra, parts)))[rank::world] if a or b]
    out = []
    for a, b in pairs:
        pieces = 1
        if max_tokens:
            longest = max(lengths[i] for i in a + b)
            most = min(len(a), len(b)) or max(len(a), len(b))  # pieces keep both streams (may pass the budget)
            pieces = max(1, min(most, -(-(len(a) + len(b)) * max(1, longest) // max_tokens)))
        out += [x + y for x, y in zip(cut(a, pieces), cut(b, pieces)) if x or y]
    return out


def eval_batches(lengths: list[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Length-sorted batches for inference (order restored by the caller), each at most `batch_size` rows and,
    given `max_tokens`, at most that many padded tokens (rows x longest row; one row always fits)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out, start = [], 0
    while start < len(order):  # longest first, so each batch's first row sets its width
        rows = min(batch_size, max(1, max_tokens // max(1, lengths[order[start]]))) if max_tokens else batch_size
        out.append(order[start : start + rows])
        start += rows
    return out
