"""Where a model's parts are, found from its structure rather than per-architecture tables.

Every strategy that trains "part of the model" needs the same map: the block stack (the largest
`nn.ModuleList`), the embeddings (backbone parameters before the first block), the top (backbone parameters
after the last block: BERT's pooler, a decoder's final norm) and the head (parameters outside the backbone:
`classifier.*`, an untied `lm_head`). Parameter order in `named_parameters` is registration order, which
for every HF model is input -> output; that is what "before" and "after" rely on.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError

# Block-relative module names of the feed-forward sublayer (BERT/RoBERTa: intermediate + block-level output;
# Llama/Qwen/Mistral: mlp; GPT-2: mlp; DistilBERT: ffn; T5-style: feed_forward).
FFN_PREFIXES = ("intermediate.", "output.", "mlp.", "ffn.", "feed_forward.")
# Output projections of the attention and feed-forward sublayers, where bottleneck adapters sit.
ATTN_OUT = ("attention.output.dense", "self_attn.o_proj", "attn.c_proj", "attention.out_lin", "attn.out_proj")
FFN_OUT = ("output.dense", "mlp.down_proj", "mlp.c_proj", "ffn.lin2", "mlp.fc2")


@dataclass
class Anatomy:
    stack: str  # dotted path of the block ModuleList, e.g. "bert.encoder.layer"
    blocks: list[list[str]]  # parameter names per block, bottom to top
    embeddings: list[str]
    top: list[str]
    head: list[str]
    ffn: list[str] = field(default_factory=list)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def layer_id(self, name: str) -> int:
        """0 for embeddings, i+1 for block i, num_blocks+1 for top, head and anything new (adapters' own
        parameters are named inside their block and get its id). Works on peft-wrapped names too."""
        # adapters are keyed by their module path with "__" for "." (ModuleDict keys cannot hold dots)
        m = re.search(re.escape(self.stack) + r"\.(\d+)\.", name.replace("__", "."))
        if m:
            return int(m.group(1)) + 1
        if any(name.endswith(e) or name.endswith(_peft_alias(e)) for e in self.embeddings):
            return 0
        return self.num_blocks + 1


def _peft_alias(name: str) -> str:
    # peft wraps a frozen module's weight as `<module>.base_layer.weight`
    mod, _, leaf = name.rpartition(".")
    return f"{mod}.base_layer.{leaf}"


def find_stack(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    best, best_n = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0:
            n = sum(p.numel() for p in mod.parameters())
            if n > best_n:
                best, best_n = (name, mod), n
    if best is None:
        raise ConfigError(f"strategy.name: {type(model).__name__} has no stack of blocks (nn.ModuleList) to select "
                          "layers from; use full, lora or dora")
    return best


def anatomy(model: torch.nn.Module) -> Anatomy:
    prefix = getattr(model, "base_model_prefix", "")
    stack, blocks_mod = find_stack(model)
    blocks: list[list[str]] = [[] for _ in blocks_mod]
    embeddings, top, head, ffn = [], [], [], []
    seen_block = False
    for name, _ in model.named_parameters():
        m = re.match(re.escape(stack) + r"\.(\d+)\.(.*)", name)
        if m:
            seen_block = True
            blocks[int(m.group(1))].append(name)
            if m.group(2).startswith(FFN_PREFIXES):  # block-relative, so BERT's attention.output.* is not FFN
                ffn.append(name)
        elif prefix and not name.startswith(prefix + "."):
            head.append(name)
        else:
            (top if seen_block else embeddings).append(name)
    return Anatomy(stack, blocks, embeddings, top, head, ffn)


def sublayer_outputs(model: torch.nn.Module, which: tuple[str, ...]) -> list[str]:
    """Module names of the attention and/or FFN output projections, one per block per kind."""
    stack, blocks = find_stack(model)
    kinds = {"attn": ATTN_OUT, "ffn": FFN_OUT}
    found = []
    for i, block in enumerate(blocks):
        names = dict(block.named_modules())
        for kind in which:
            hit = next((c for c in kinds[kind] if c in names), None)
            if hit is None:
                raise ConfigError(f"strategy.name: adapter: no {kind} output projection found in {stack}.{i} "
                                  f"(looked for {', '.join(kinds[kind])}); use lora instead")
            found.append(f"{stack}.{i}.{hit}")
    return found
