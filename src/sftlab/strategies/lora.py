"""LoRA and DoRA through HF `peft` (Hu et al. 2021; Liu et al. 2024). The task head always trains and is
saved with the adapter (peft's `modules_to_save`), so a reloaded classifier is never random."""
from __future__ import annotations

from peft import LoraConfig, TaskType, get_peft_model

from ..registry import strategies
from .basic import head_parameter_names


def _lora(model, cfg, use_dora: bool):
    causal = getattr(model.config, "is_decoder", False) or type(model).__name__.endswith("ForCausalLM")
    heads = sorted({n.split(".")[0] for n in head_parameter_names(model)}) if not causal else None
    target = cfg.target_modules
    lcfg = LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_dora=use_dora,
        target_modules=target if isinstance(target, str) else list(target),
        task_type=TaskType.CAUSAL_LM if causal else TaskType.SEQ_CLS,
        modules_to_save=heads,
    )
    return get_peft_model(model, lcfg)


@strategies.register("lora")
def lora(model, cfg):
    return _lora(model, cfg, use_dora=False)


@strategies.register("dora")
def dora(model, cfg):
    return _lora(model, cfg, use_dora=True)
