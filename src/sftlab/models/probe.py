"""The evidence behind every forward patch (first_token, fused_attention): patched logits == the class's own."""
from __future__ import annotations

import torch


@torch.no_grad()
def patched_equals_unpatched(model: torch.nn.Module, patched: list[torch.nn.Module], vocab_size: int) -> bool:
    """Logits with the instance `forward`s of `patched` == with their classes' forwards, on a random padded batch in
    eval mode (dropout off); any exception means the patch does not fit (False). The patches are left in place."""
    was_training = model.training
    model.eval()
    try:
        g = torch.Generator().manual_seed(0)
        device = next(model.parameters()).device
        ids = torch.randint(5, max(6, min(vocab_size, 1000)), (3, 9), generator=g).to(device)
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        mask[2, 3:] = 0
        ours = model(input_ids=ids, attention_mask=mask).logits.float()
        saved = [m.__dict__.pop("forward") for m in patched]
        try:
            reference = model(input_ids=ids, attention_mask=mask).logits.float()
        finally:
            for m, forward in zip(patched, saved):
                m.forward = forward
        return ours.shape == reference.shape and bool(torch.allclose(ours, reference, atol=1e-5, rtol=1e-4))
    except Exception:  # noqa: BLE001  (any architecture the patch does not fit stays unpatched)
        return False
    finally:
        model.train(was_training)
