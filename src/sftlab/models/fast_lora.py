"""LoRA's forward under bf16 autocast without the round trip through fp32 (Hu et al. 2021; peft's `lora.Linear`).

peft computes `base(x) + B(A(dropout(x))) * scaling` after casting x to the adapter weights' dtype: under autocast
the adapters are fp32, so the bf16 activations of o_proj/down_proj are cast up, dropped out in fp32 and cast down
again by autocast for A's matmul, and the fp32 inputs of q/k/v/gate/up (the norm's fp32 output) are cast to bf16
twice, once for the base and once for A; backward repeats each cast for the gradient. On smollm2-135m LoRA all-
linear (one packed 512-token row, 2-core CPU) those casts and fp32 masks were ~15% of a micro-batch (issue 22). Here
x is cast to the autocast dtype once and both branches read it; dropout multiplies in that dtype (a 0/1 mask, then
the 1/(1-p) scale as a scalar: one rounding, no bias). Without dropout the forward is peft's to the bit (autocast
would cast the same x to the same bf16 for both matmuls); backward adds the two branches' input gradients in bf16
before the one cast up, where peft adds them in fp32 (one bf16 rounding of the sum, the size of the roundings bf16
matmuls already make; tests/unit/test_packed_attention.py). With dropout, x is rounded to bf16 before the mask
instead of after. Anything else (no autocast, merged or several adapters, DoRA and other variants, mixed-batch
adapter names) runs peft's own forward.
"""
from __future__ import annotations

import types

import torch


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    device = x.device.type
    active = self.active_adapters
    if (args or kwargs or self.disable_adapters or self.merged or len(active) != 1
            or not torch.is_autocast_enabled(device) or active[0] not in self.lora_A or active[0] in self.lora_variant):
        return type(self).forward(self, x, *args, **kwargs)
    name = active[0]
    x = x.to(torch.get_autocast_dtype(device))
    return self.base_layer(x) + self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x))) * self.scaling[name]


def use_fast_lora(model: torch.nn.Module) -> int:
    """Gives every peft `lora.Linear` over an `nn.Linear` the forward above (an instance attribute: the class, the
    state dict and saving are peft's); returns how many."""
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:
        return 0
    n = 0
    for m in model.modules():
        if type(m) is Linear and isinstance(m.base_layer, torch.nn.Linear) and not m.fan_in_fan_out:
            m.forward = types.MethodType(_forward, m)
            n += 1
    return n
