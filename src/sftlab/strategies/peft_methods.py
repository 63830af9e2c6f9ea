"""LoRA, DoRA, prompt tuning and prefix tuning through HF `peft` (Hu et al. 2021; Liu et al. 2024; Lester et
al. 2021; Li & Liang 2021). The task head always trains and is saved with the adapter (peft's
`modules_to_save`), so a reloaded classifier is never random.

peft is imported where a leaf runs, not at registration: its import costs ~1-2 s of every command (issue 22's
fixed costs), and full fine-tuning never needs it."""
from __future__ import annotations

from ..errors import ConfigError
from ..registry import strategies
from .basic import head_parameter_names


def _task(model, ctx):
    from peft import TaskType

    causal = ctx.task == "causal_lm"
    heads = None if causal else sorted({n.split(".")[0] for n in head_parameter_names(model)})
    return (TaskType.CAUSAL_LM if causal else TaskType.SEQ_CLS), heads


def _peft(model, config):
    from peft import get_peft_model

    from ..models.load import peft_calls
    from . import Plan

    with peft_calls():
        wrapped = get_peft_model(model, config)
    # DoRA reads its base weight outside any matmul (the column norm, in fp32): it keeps fp32 frozen weights.
    return Plan(wrapped, frozen_base_not_saved=not getattr(config, "use_dora", False))


def _lora(model, cfg, ctx, use_dora: bool):
    from peft import LoraConfig

    task_type, heads = _task(model, ctx)
    target = cfg.target_modules
    lcfg = LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_dora=use_dora,
        target_modules=target if isinstance(target, str) else list(target),
        task_type=task_type, modules_to_save=heads,
    )
    return _peft(model, lcfg)


@strategies.register("lora")
def lora(model, cfg, ctx):
    return _lora(model, cfg, ctx, use_dora=False)


@strategies.register("dora")
def dora(model, cfg, ctx):
    return _lora(model, cfg, ctx, use_dora=True)


@strategies.register("prompt_tuning")
def prompt_tuning(model, cfg, ctx):
    """`strategy.num_virtual_tokens` trained input embeddings prepended to every sequence."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and ctx.max_length and ctx.max_length + cfg.num_virtual_tokens > limit:
        raise ConfigError(f"strategy.num_virtual_tokens: {cfg.num_virtual_tokens} virtual tokens + data.max_length "
                          f"{ctx.max_length} exceed the model's {limit} positions; lower one of them")
    from peft import PromptTuningConfig

    task_type, heads = _task(model, ctx)
    return _peft(model, PromptTuningConfig(task_type=task_type, num_virtual_tokens=cfg.num_virtual_tokens,
                                                    modules_to_save=heads))


@strategies.register("prefix_tuning")
def prefix_tuning(model, cfg, ctx):
    """`strategy.num_virtual_tokens` trained key/value vectors per layer, prepended to every attention."""
    from peft import PrefixTuningConfig

    task_type, heads = _task(model, ctx)
    return _peft(model, PrefixTuningConfig(task_type=task_type, num_virtual_tokens=cfg.num_virtual_tokens,
                                                    modules_to_save=heads))
