"""LazyRowAdamW: exactly AdamW on the rows a step touches; untouched rows (and their moments) stay put."""
from __future__ import annotations

import copy

import pytest
import torch

from sftlab.config import TrainConfig
from sftlab.train.optim import LazyRowAdamW, build_optimizer, lazy_embedding


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.out = torch.nn.Linear(4, 3)

    def get_input_embeddings(self):
        return self.emb

    def get_output_embeddings(self):
        return None

    def forward(self, ids):
        return self.out(self.emb(ids).mean(1))


def run(model, opt_cls, batches, **groups_kw):
    lazy = {"lazy_rows": True} if opt_cls is LazyRowAdamW else {}
    opt = opt_cls([{"params": [model.emb.weight], "weight_decay": 0.1, **lazy},
                   {"params": list(model.out.parameters()), "weight_decay": 0.0}], lr=0.05, fused=True)
    for ids in batches:
        model(ids).square().sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


def test_equals_adamw_when_every_row_is_touched():
    torch.manual_seed(0)
    a, batches = Toy(), [torch.arange(10).view(2, 5)[:, torch.randperm(5)] for _ in range(6)]
    b = copy.deepcopy(a)
    run(a, torch.optim.AdamW, batches)
    run(b, LazyRowAdamW, batches)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_untouched_rows_and_their_moments_stay_put():
    torch.manual_seed(0)
    model = Toy()
    before = model.emb.weight.detach().clone()
    opt = run(model, LazyRowAdamW, [torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 4]])])
    w, state = model.emb.weight.detach(), opt.state[model.emb.weight]
    untouched = [0, 5, 6, 7, 8, 9]
    assert torch.equal(w[untouched], before[untouched]) and not torch.equal(w[[1, 2, 3, 4]], before[[1, 2, 3, 4]])
    assert not state["exp_avg"][untouched].any() and not state["exp_avg_sq"][untouched].any()
    assert float(state["step"]) == 2  # global step: row 4's first update is bias-corrected as step 2, as LazyAdam


def test_state_round_trip_resumes_identically():
    torch.manual_seed(0)
    batches = [torch.randint(0, 10, (2, 3)) for _ in range(6)]
    ref = Toy()
    start = copy.deepcopy(ref)
    run(ref, LazyRowAdamW, batches)
    half = copy.deepcopy(start)
    opt = run(half, LazyRowAdamW, batches[:3])
    resumed = copy.deepcopy(half)
    opt2 = LazyRowAdamW([{"params": [resumed.emb.weight], "weight_decay": 0.1, "lazy_rows": True},
                         {"params": list(resumed.out.parameters()), "weight_decay": 0.0}], lr=0.05, fused=True)
    opt2.load_state_dict(opt.state_dict())
    for ids in batches[3:]:
        resumed(ids).square().sum().backward()
        opt2.step()
        opt2.zero_grad(set_to_none=True)
    for pa, pb in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(pa, pb)


def test_build_optimizer_uses_it_for_untied_input_embeddings_only(tiny_model_dir, tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    bert = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    opt = build_optimizer(bert, TrainConfig())  # on by default
    lazy = [g for g in opt.param_groups if g.get("lazy_rows")]
    assert isinstance(opt, LazyRowAdamW) and len(lazy) == 1
    assert lazy[0]["params"] == [bert.bert.embeddings.word_embeddings.weight] and lazy[0]["weight_decay"] > 0
    assert type(build_optimizer(bert, TrainConfig(lazy_embeddings=False))) is torch.optim.AdamW
    llama = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    llama.lm_head.weight = llama.model.embed_tokens.weight  # tied: dense gradient, nothing to skip
    assert lazy_embedding(llama) is None


@pytest.mark.parametrize("strategy", ["full", "gradual_unfreezing"])
def test_training_with_lazy_embeddings_resumes_bitwise(tiny_overrides, tmp_path, monkeypatch, strategy):
    from safetensors.torch import load_file

    import sftlab.train.loop as loop
    from sftlab.config import load_config

    over = tiny_overrides + ["train.lazy_embeddings=true", "train.eval_every=3", f"strategy.name={strategy}"]
    over += ["strategy.unfreeze_every=2"] if strategy == "gradual_unfreezing" else []
    over = [o for o in over if not o.startswith("output_dir=")]
    ref = loop.train(load_config(None, over + [f"output_dir={tmp_path / 'ref'}"]))
    from tests.conftest import crash_after_checkpoint

    real = crash_after_checkpoint(monkeypatch, calls=2)
    with pytest.raises(KeyboardInterrupt):
        loop.train(load_config(None, over + [f"output_dir={tmp_path / 'cut'}"]))
    monkeypatch.setattr(loop, "save_checkpoint", real)
    cut = loop.train(load_config(None, over + [f"output_dir={tmp_path / 'cut'}"]), resume=tmp_path / "cut")

    def last(d):
        return load_file(str(sorted((d / "checkpoints").glob("step-*"))[-1] / "model.safetensors"))

    a, b = last(ref), last(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sparse_gradients_train_what_dense_lazy_gradients_train(tiny_overrides, tmp_path, monkeypatch):
    """Row-sparse embedding gradients (one process) == the dense lazy path; clipping included (max norm 1e-2
    forces it on every step), gradient accumulation too."""
    from safetensors.torch import load_file

    import sftlab.train.loop as loop
    from sftlab.config import load_config

    over = [o for o in tiny_overrides if not o.startswith("output_dir=")]
    over += ["train.lazy_embeddings=true", "train.max_grad_norm=0.01", "train.grad_accum=2", "train.epochs=1"]
    seen = []
    real = loop.sparse_embedding_gradients
    monkeypatch.setattr(loop, "sparse_embedding_gradients", lambda m: seen.append(real(m)) or seen[-1])
    sparse = loop.train(load_config(None, over + [f"output_dir={tmp_path / 'sparse'}"]))
    monkeypatch.setattr(loop, "sparse_embedding_gradients", lambda m: False)
    dense = loop.train(load_config(None, over + [f"output_dir={tmp_path / 'dense'}"]))
    assert seen == [True]
    a, b = (load_file(str(d / "best" / "model.safetensors")) for d in (sparse, dense))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
