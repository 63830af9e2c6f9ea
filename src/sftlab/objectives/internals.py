"""Intermediate-layer distillation (TinyBERT, Jiao et al. 2020, section 3.1): the student's attention maps and hidden
states learn from a live, frozen teacher's, layer by layer (`objective.attention_weight`, `hidden_weight`).

Unlike logits, these terms compare token by token, so the teacher must read the student's own input ids: it needs
the same tokenizer (checked: the vocabularies must be equal) and, for attention maps, as many heads per layer. The
teacher runs live (no grad, eval mode) on each micro-batch instead of from the logit cache: its attentions for 67k
rows would not fit a cache (6 layers x 12 heads x T^2 floats a row). Its logits from the same pass are the soft
targets. Student layer i learns from teacher layer `layer_map[i]` (auto: uniform, TinyBERT's g(m) = m * N / M).

Pitfalls (TinyBERT, MiniLM): hidden widths differ between students and teachers, so the student's states go through
a learned linear projection (a trainable extra: it is in the optimizer and in every checkpoint, never in `best/`);
attention probabilities are compared on real query/key pairs only (padding would otherwise dominate short rows);
the student must be run with eager attention (sdpa returns no maps) and without the first-token shortcut of the
last block (it computes one position there), which the loop turns off when an objective asks for internals.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from .kd_losses import attention_mse, hidden_mse, uniform_layer_map


class Recording:
    """Calls the model with extra output flags and keeps its output: the task loss runs unchanged on top."""

    def __init__(self, model, **flags):
        self.model, self.flags, self.out = model, flags, None

    def __call__(self, **inputs):
        self.out = self.model(**inputs, **self.flags)
        return self.out


def plan(cfg, folder, student_tokenizer):
    """(layer map, student config, teacher config) for the intermediate terms, or a ConfigError naming the key.
    Reads configs and tokenizers only, so the loop can call it before anything is written."""
    from transformers import AutoConfig, AutoTokenizer

    from ..models import resolve_model

    o, spec = cfg.objective, cfg.objective.teacher
    t_cfg = AutoConfig.from_pretrained(folder)
    if any(a.endswith("ForCausalLM") for a in t_cfg.architectures or []):
        raise ConfigError(f"objective.teacher: {spec} is a decoder; an encoder student needs an encoder teacher")
    if AutoTokenizer.from_pretrained(folder).get_vocab() != student_tokenizer.get_vocab():
        raise ConfigError(f"objective.teacher: {spec} has another tokenizer than the student; attention_weight and "
                          f"hidden_weight compare token by token and need the same one (logit distillation alone "
                          f"works across tokenizers: set both to 0)")
    s_cfg = AutoConfig.from_pretrained(resolve_model(cfg.model.name), trust_remote_code=cfg.model.trust_remote_code)
    n_student = len(cfg.model.keep_layers) if cfg.model.keep_layers else s_cfg.num_hidden_layers
    n_teacher = t_cfg.num_hidden_layers
    if o.layer_map == "auto":
        try:
            layer_map = uniform_layer_map(n_student, n_teacher)
        except ValueError as e:
            raise ConfigError(f"objective.layer_map: {e}") from None
    else:
        layer_map = list(o.layer_map)
        if len(layer_map) != n_student or not all(0 <= j < n_teacher for j in layer_map):
            raise ConfigError(f"objective.layer_map: {layer_map} needs one teacher layer in [0, {n_teacher - 1}] "
                              f"for each of the student's {n_student} layers (or auto)")
    if o.attention_weight and s_cfg.num_attention_heads != t_cfg.num_attention_heads:
        raise ConfigError(f"objective.attention_weight: the student has {s_cfg.num_attention_heads} attention heads "
                          f"per layer and the teacher {t_cfg.num_attention_heads}; attention maps are compared head "
                          f"by head (set attention_weight=0, or pick a teacher with as many)")
    return layer_map, s_cfg, t_cfg


class LiveTeacher:
    """The frozen teacher, run on the student's micro-batches; owns the layer map and the hidden projection."""

    def __init__(self, folder, cfg, tokenizer, open_teacher):
        o = cfg.objective
        self.attention_weight, self.hidden_weight = o.attention_weight, o.hidden_weight
        self.layer_map, s_cfg, t_cfg = plan(cfg, folder, tokenizer)
        teacher = open_teacher(folder)
        model = getattr(teacher, "model", None)
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"objective.teacher: {o.teacher} is an ONNX export; attention/hidden distillation needs "
                              f"its PyTorch weights (a run directory or an hf/merged export)")
        self.labels = teacher.labels
        model.eval().requires_grad_(False)
        if self.attention_weight:
            model.set_attn_implementation("eager")  # sdpa returns no attention maps
        self.model = model
        self.extras = torch.nn.ModuleDict()
        if self.hidden_weight and s_cfg.hidden_size != t_cfg.hidden_size:
            # TinyBERT's W_h; seeded by train.seed through the loop's set_seed, like any fresh weight
            self.extras["hidden_proj"] = torch.nn.Linear(s_cfg.hidden_size, t_cfg.hidden_size)

    def flags(self) -> dict[str, bool]:
        return {"output_attentions": bool(self.attention_weight), "output_hidden_states": bool(self.hidden_weight)}

    @torch.no_grad()
    def forward(self, batch: dict):
        device = batch["input_ids"].device
        if next(self.model.parameters()).device != device:
            self.model.to(device)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return self.model(**inputs, **self.flags())

    def terms(self, student_out, teacher_out, mask: torch.Tensor, rows: torch.Tensor | None = None) -> dict:
        """{attention, hidden}: per-row sums over `rows` (a bool selector of the micro-batch's rows, all if None)."""
        def pick(layers):
            return [x if rows is None else x[rows] for x in layers]

        m = mask if rows is None else mask[rows]
        out = {}
        if self.attention_weight:
            out["attention"] = attention_mse(pick(student_out.attentions), pick(teacher_out.attentions),
                                             self.layer_map, m)
        if self.hidden_weight:
            proj = self.extras["hidden_proj"] if "hidden_proj" in self.extras else None
            out["hidden"] = hidden_mse(pick(student_out.hidden_states), pick(teacher_out.hidden_states),
                                       self.layer_map, m, proj)
        return out
