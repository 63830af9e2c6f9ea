"""Issue 22's decoder levers as equations: per-example attention in packed rows == the block-diagonal masked kernel;
frozen Linear weights held in bf16 == autocast's own casts (bitwise); LoRA's dropouts take the fast masks."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from sftlab.config import load_config
from sftlab.models.packed_attention import segments, use_packed_attention
from sftlab.precision import frozen_linears_to_bf16
from sftlab.train.loop import train
from tests.conftest import make_chats, write_jsonl

POS = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 0, 0]])


def tiny_llama(dtype=torch.float64, tied=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).to(dtype)


def test_segments_follow_position_restarts():
    assert segments(POS) == [[(0, 5), (5, 8), (8, 12)], [(0, 8), (8, 10), (10, 11), (11, 12)]]
    assert segments(torch.arange(6).repeat(2, 1)) is None  # nothing packed: transformers' sdpa path


def test_per_example_attention_equals_the_masked_kernel():
    ref = tiny_llama().train()
    packed = copy.deepcopy(ref)
    assert use_packed_attention(packed)
    ids = torch.randint(0, 50, POS.shape)
    outs = []
    for m in (ref, packed):
        out = m(input_ids=ids, position_ids=POS, use_cache=False).logits
        out.pow(2).sum().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-12)
    for (name, a), b in zip(ref.named_parameters(), packed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12, msg=name)
    alone = packed(input_ids=ids[:1, 5:8], use_cache=False).logits  # one example on its own: its slice of the pack
    torch.testing.assert_close(alone[0], outs[1][0, 5:8], rtol=0, atol=1e-12)


def test_unpacked_and_eval_batches_keep_the_sdpa_path_bitwise():
    ref = tiny_llama(torch.float32)
    packed = copy.deepcopy(ref)
    use_packed_attention(packed)
    ids, mask = torch.randint(0, 50, (2, 7)), torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    for mode in ("train", "eval"):
        getattr(ref, mode)(), getattr(packed, mode)()
        got = [m(input_ids=ids, attention_mask=mask).logits for m in (ref, packed)]
        assert torch.equal(*got)
    ref.eval(), packed.eval()  # eval mode ignores the packing rule: the masked kernel, as sdpa runs it
    assert torch.equal(ref(input_ids=ids, position_ids=POS[:, :7], use_cache=False).logits,
                       packed(input_ids=ids, position_ids=POS[:, :7], use_cache=False).logits)


def test_frozen_bf16_weights_equal_autocast_casts_bitwise():
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    ref = get_peft_model(tiny_llama(torch.float32, tied=True), lcfg)
    for p in ref.parameters():  # LoRA B starts at zero: give it values so its gradient path is exercised
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    held = copy.deepcopy(ref)
    n = frozen_linears_to_bf16(held)
    assert n == 2 * 7  # q, k, v, o, gate, up, down per layer; the output layer, tied to the embeddings, stays fp32
    assert held.get_output_embeddings().weight.dtype == torch.float32
    ids = torch.randint(0, 50, (2, 9))
    for m in (ref, held):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m._loss = m(input_ids=ids, labels=ids).loss
        m._loss.backward()
    assert torch.equal(ref._loss, held._loss)
    trained = [(a, b) for a, b in zip(ref.parameters(), held.parameters()) if a.requires_grad]
    assert trained and all(torch.equal(a.grad, b.grad) for a, b in trained)


@pytest.fixture
def chat_run(tiny_llama_dir, tmp_path):
    tr = write_jsonl(tmp_path / "train.jsonl", make_chats(32))

    def run(name, *extra):
        over = ["task=causal_lm", f"model.name={tiny_llama_dir}", f"data.train={tr}", "data.max_length=160",
                "data.packing=true", "train.epochs=1", "train.batch_size=4", "train.lr=3e-3", "train.progress=false",
                "train.seed=0", "strategy.name=lora", *extra, f"output_dir={tmp_path / name}"]
        return train(load_config(None, over))
    return run


def test_packed_lora_run_equals_the_masked_kernel_run(chat_run, monkeypatch):
    """End to end (fp32, no dropout): the per-example path trains the weights the masked kernel does."""
    import sftlab.models.packed_attention as pa
    from safetensors.torch import load_file

    used = []
    real = pa.use_packed_attention
    monkeypatch.setattr(pa, "use_packed_attention", lambda m: used.append(real(m)) or used[-1])
    a = chat_run("packed", "train.precision=fp32", "strategy.dropout=0")
    b = chat_run("masked", "train.precision=fp32", "strategy.dropout=0", "model.attention=eager")
    assert used == [True, False]
    wa, wb = (load_file(str(d / "best" / "adapter_model.safetensors")) for d in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6, msg=k)


def test_checkpointed_recompute_takes_the_same_per_example_path(chat_run):
    """Activation checkpointing recomputes each block in backward from its saved inputs (position ids included):
    the same attention path, so the same adapter as without checkpointing."""
    from safetensors.torch import load_file

    a = chat_run("plain", "train.precision=fp32", "strategy.dropout=0")
    b = chat_run("ckpt", "train.precision=fp32", "strategy.dropout=0", "train.gradient_checkpointing=true")
    wa, wb = (load_file(str(d / "best" / "adapter_model.safetensors")) for d in (a, b))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-7, msg=k)


def test_lora_run_in_bf16_trains_and_saves_fp32_adapters(chat_run, monkeypatch):
    """bf16 autocast: frozen base held in bf16, LoRA's dropouts fast; the adapter saved stays fp32 and loads."""
    import sftlab.models.fast_dropout as fd
    from safetensors.torch import load_file

    seen = []
    real = fd.use_fast_dropout
    monkeypatch.setattr(fd, "use_fast_dropout", lambda m: seen.append(real(m)) or seen[-1])
    run_dir = chat_run("bf16", "train.precision=bf16", "strategy.dropout=0.1")
    assert seen and seen[0] >= 2 * 7  # every LoRA dropout (7 per layer), not only the model's own
    weights = load_file(str(run_dir / "best" / "adapter_model.safetensors"))
    assert weights and all(w.dtype == torch.float32 for w in weights.values())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["precision"] == "bf16" and summary["final_loss"] == summary["final_loss"]  # finite


def test_fast_lora_forward_is_pefts_and_its_gradients_as_close_to_fp32():
    """Without dropout: the same loss to the bit; gradients within bf16's own distance from the fp32 ones (the two
    branches' input gradients add in bf16). With dropout: runs, close. Outside autocast: peft's forward."""
    import statistics

    from peft import LoraConfig, get_peft_model

    from sftlab.models.fast_lora import use_fast_lora

    for p_drop in (0.0, 0.1):
        ref = get_peft_model(tiny_llama(torch.float32, tied=True),
                             LoraConfig(r=4, lora_alpha=8, lora_dropout=p_drop, target_modules="all-linear"))
        for p in ref.parameters():
            if p.requires_grad:
                p.data.normal_(0, 0.1)
        fast, fp32 = copy.deepcopy(ref), copy.deepcopy(ref)
        assert use_fast_lora(fast) == 2 * 7
        ids = torch.randint(0, 50, (2, 9))
        losses = []
        for m, autocast in ((ref, True), (fast, True), (fp32, False)):
            torch.manual_seed(1)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.detach())
        if p_drop == 0:
            assert torch.equal(losses[0], losses[1])
            exact = [p.grad for p in fp32.parameters() if p.requires_grad]

            def err(m):
                got = [p.grad for p in m.parameters() if p.requires_grad]
                return statistics.median(((a - b).norm() / b.norm()).item() for a, b in zip(got, exact))
            assert err(fast) <= 1.5 * err(ref), (err(fast), err(ref))
        else:  # dropout draws on bf16 rounded inputs: close, not equal
            assert torch.isfinite(losses[1]) and abs(losses[0].item() - losses[1].item()) < 0.1
        ref.eval(), fast.eval()  # outside autocast: peft's own forward, the same bits
        with torch.no_grad():
            assert torch.equal(ref(input_ids=ids).logits, fast(input_ids=ids).logits)


@pytest.mark.parametrize("strategy", ["lora", "prompt_tuning"])
def test_encoder_adapter_runs_in_bf16_with_a_bf16_base(tiny_overrides, strategy):
    """Encoders too (fused attention, first-token last block, the head saved with the adapter): a bf16 run with the
    frozen base in bf16 trains, evaluates inside the loop and saves a reloadable adapter."""
    from sftlab.eval.evaluate import evaluate_file

    over = [o for o in tiny_overrides if not o.startswith("train.precision")]
    over += ["train.precision=bf16", f"strategy.name={strategy}", "data.max_length=64"]
    run_dir = train(load_config(None, over))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["precision"] == "bf16" and summary["dev_metrics"]["accuracy"] >= 0
    data = next(o.split("=", 1)[1] for o in over if o.startswith("data.dev="))
    assert 0 <= evaluate_file(run_dir, data)["accuracy"] <= 1
