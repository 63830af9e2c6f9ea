"""Knowledge-distillation loss terms, as SUMS over rows (the loop's exactness contract: it divides by loss units).

- `soft_kl` (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network", section 2): KL from the
  teacher's temperature-T distribution to the student's, times T^2. Pitfall: without the T^2 factor the soft
  term's gradients shrink as 1/T^2 and alpha silently changes meaning with T (TextBrewer's `kd_ce_loss` leaves it
  out; torchtune's `ForwardKLLoss` has no temperature at all). With it, at large T the gradient on logit i tends to
  ((z_i - mean z) - (v_i - mean v)) / C: logit matching (tested).
- `topk_kl`: token-level KD for decoders from the teacher's top-k next-token distribution plus one "rest" bucket
  holding the mass outside it (so a k-wide cache suffices and a teacher equal to the student still gives exactly
  zero; renormalising over the k tokens alone would not). k = vocabulary equals `soft_kl`.
- `attention_mse` / `hidden_mse` (TinyBERT, Jiao et al. 2020, section 3.1): MSE between a student layer and its
  mapped teacher layer, on real tokens only; `hidden_mse` takes a learned projection when widths differ.
- `uniform_layer_map` (TinyBERT's g(m) = m * N / M): student layer i learns from teacher layer (i+1) * N/M - 1.
Shapes: logits [rows, C]; attentions [rows, heads, T, T]; hidden [rows, T, width]; mask [rows, T] (1 = real token).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """sum over rows of T^2 * KL(softmax(teacher / T) || softmax(student / T)); fp32 whatever the inputs."""
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    s = F.log_softmax(student.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum() * temperature ** 2


def mix(hard_sum: torch.Tensor, soft_sum: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - alpha) * hard + alpha * soft; alpha = 0 returns `hard_sum` itself (plain SFT, bit for bit)."""
    if alpha == 0:
        return hard_sum
    return (1 - alpha) * hard_sum + alpha * soft_sum


def topk_kl(student: torch.Tensor, top_values: torch.Tensor, top_ids: torch.Tensor, temperature: float,
            teacher_lse: torch.Tensor | None = None) -> torch.Tensor:
    """sum over positions of T^2 * KL(p || q) on the partition {the teacher's top k tokens, everything else}.
    student [P, V] logits; top_values / top_ids [P, k]: the teacher's k largest logits and their token ids;
    teacher_lse [P]: logsumexp of the teacher's logits / T over the whole vocabulary. The "rest" bucket keeps the
    teacher's leftover mass, so the loss is zero (with zero gradient) exactly when the student agrees on the
    partition, and k = V is `soft_kl`. Without `teacher_lse` the teacher is renormalised over its k tokens."""
    t = top_values.float() / temperature
    logp = t - (teacher_lse.float()[:, None] if teacher_lse is not None else t.logsumexp(-1, keepdim=True))
    logq_all = F.log_softmax(student.float() / temperature, dim=-1)
    logq = logq_all.gather(-1, top_ids)
    p = logp.exp()
    loss = (p * (logp - logq)).sum()
    if teacher_lse is not None:  # the leftover mass of both, as one more outcome
        p_rest = (1 - p.sum(-1)).clamp(min=0)
        q_rest = (1 - logq.exp().sum(-1)).clamp(min=1e-12)
        loss = loss + torch.where(p_rest > 0, p_rest * (p_rest.clamp(min=1e-12).log() - q_rest.log()), 0).sum()
    return loss * temperature ** 2


def attention_mse(student: list[torch.Tensor], teacher: list[torch.Tensor], layer_map: list[int],
                  mask: torch.Tensor) -> torch.Tensor:
    """sum over rows of the mean squared difference of each student layer's attention probabilities and its
    mapped teacher layer's, over real query/key pairs (heads must match)."""
    pair = (mask[:, None, :, None] * mask[:, None, None, :]).float()  # [rows, 1, T, T]
    total = student[0].new_zeros((), dtype=torch.float32)
    for i, j in enumerate(layer_map):
        s, t = student[i].float(), teacher[j].float()
        if s.shape != t.shape:
            raise ValueError(f"attention maps differ in shape: student layer {i} {tuple(s.shape)}, teacher layer "
                             f"{j} {tuple(t.shape)}; attention distillation needs the same heads and tokenizer")
        per_row = (((s - t) ** 2) * pair).sum(dim=(1, 2, 3)) / (pair.sum(dim=(1, 2, 3)) * s.shape[1]).clamp(min=1)
        total = total + per_row.sum()
    return total


def hidden_mse(student: list[torch.Tensor], teacher: list[torch.Tensor], layer_map: list[int], mask: torch.Tensor,
               proj: torch.nn.Module | None = None) -> torch.Tensor:
    """sum over rows of the mean squared difference of (projected) student hidden states and the mapped teacher
    layer's, over real tokens. `student`/`teacher` hold per-layer outputs (index 0 = embeddings, as HF returns)."""
    m = mask.float()[..., None]  # [rows, T, 1]
    total = student[0].new_zeros((), dtype=torch.float32)
    for i, j in enumerate(layer_map):
        s = student[i + 1].float()
        s = proj(s) if proj is not None else s
        t = teacher[j + 1].float()
        if s.shape != t.shape:
            raise ValueError(f"hidden states differ in shape: student {tuple(s.shape)}, teacher {tuple(t.shape)}; "
                             f"widths need a projection and the sequences the same tokenizer")
        per_row = (((s - t) ** 2) * m).sum(dim=(1, 2)) / (m.sum(dim=(1, 2)) * s.shape[-1]).clamp(min=1)
        total = total + per_row.sum()
    return total


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Student layer i (0-based) <- teacher layer (i + 1) * N / M - 1: the top layers line up (TinyBERT)."""
    if not 0 < student_layers <= teacher_layers:
        raise ValueError(f"layer_map auto needs 0 < student layers ({student_layers}) <= teacher layers "
                         f"({teacher_layers}); give objective.layer_map explicitly")
    return [(i + 1) * teacher_layers // student_layers - 1 for i in range(student_layers)]
