"""Causal-LM rows: next-token targets, best-fit packing, padding-free collation.

Targets are aligned at encode time: `labels[t]` is the token the model must predict *at* position t
(input_ids[t + 1] where the loss mask is on, else -100). Each example's last position has -100, so when
examples are packed back to back nothing is ever predicted across a boundary.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch

IGNORE = -100


@dataclass
class LMEncoded:
    """One row per example, or per pack when `position_ids` is set (packing)."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    position_ids: list[list[int]] | None = None
    counts: dict = field(default_factory=dict)  # truncated / dropped examples
    examples: int = 0  # examples before packing

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.input_ids]

    @property
    def weights(self) -> list[int]:
        """Loss tokens per row: the loop divides a step's summed loss by their total."""
        return [sum(t != IGNORE for t in row) for row in self.labels]

    @property
    def row_examples(self) -> list[int]:
        """Examples in each row: 1, or for a pack the number of examples packed into it (positions restart)."""
        if self.position_ids is None:
            return [1] * len(self.input_ids)
        return [sum(1 for p in row if p == 0) for row in self.position_ids]

    @property
    def truncated(self) -> int:
        return self.counts.get("truncated", 0)


def shift_targets(ids: list[int], mask: list[int]) -> list[int]:
    return [ids[t + 1] if mask[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]


def build(input_ids: list[list[int]], masks: list[list[int]], counts: dict) -> LMEncoded:
    return LMEncoded(input_ids, [shift_targets(i, m) for i, m in zip(input_ids, masks)], None, dict(counts),
                     len(input_ids))


def pack(data: LMEncoded, budget: int) -> LMEncoded:
    """Best-fit decreasing: each example (longest first) goes to the fullest pack it still fits in.

    Position ids restart at 0 for every example; transformers builds block-diagonal causal attention from
    them (masking_utils.find_packed_sequence_indices), so attention never crosses examples.
    """
    order = sorted(range(len(data)), key=lambda i: (-len(data.input_ids[i]), i))
    packs: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, pack index), sorted
    for i in order:
        n = len(data.input_ids[i])
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            cap, p = free.pop(k)
            packs[p].append(i)
            bisect.insort(free, (cap - n, p))
        else:
            packs.append([i])
            bisect.insort(free, (budget - n, len(packs) - 1))
    ids, labels, pos = [], [], []
    for members in packs:
        ids.append([t for i in members for t in data.input_ids[i]])
        labels.append([t for i in members for t in data.labels[i]])
        pos.append([p for i in members for p in range(len(data.input_ids[i]))])
    return LMEncoded(ids, labels, pos, data.counts, data.examples)


def collate_lm(data: LMEncoded, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(data.input_ids[i]) for i in indices)
    ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    labels = torch.full((len(indices), width), IGNORE, dtype=torch.long)
    for row, i in enumerate(indices):
        n = len(data.input_ids[i])
        ids[row, :n] = torch.tensor(data.input_ids[i])
        labels[row, :n] = torch.tensor(data.labels[i])
    batch = {"input_ids": ids, "labels": labels}
    if data.position_ids is None:
        mask = torch.zeros((len(indices), width), dtype=torch.long)
        for row, i in enumerate(indices):
            mask[row, : len(data.input_ids[i])] = 1
        batch["attention_mask"] = mask
    else:  # padding-free: no attention mask; the tail padding forms its own "example" with no loss
        pos = torch.zeros((len(indices), width), dtype=torch.long)
        for row, i in enumerate(indices):
            n = len(data.position_ids[i])
            pos[row, :n] = torch.tensor(data.position_ids[i])
            pos[row, n:] = torch.arange(width - n)
        batch["position_ids"] = pos
    return batch
