"""model.pooling: mean == the head on the attention-masked mean of the last hidden states, in memory, saved,
loaded, served and exported."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import model_pair, padded_batch

pytestmark = pytest.mark.usefixtures("single_thread")


def test_logits_are_the_head_on_the_masked_mean(tiny_model_dir):
    from sftlab.models.pooling import apply_pooling, masked_mean

    plain, mean = model_pair(tiny_model_dir)
    assert apply_pooling(mean, "mean") and apply_pooling(mean, "mean")  # idempotent
    plain.eval(), mean.eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        hidden = plain.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        by_hand = plain.classifier(masked_mean(hidden, mask))
        torch.testing.assert_close(mean(input_ids=ids, attention_mask=mask).logits, by_hand, rtol=1e-5, atol=1e-6)
        # padding is not read: row 3 alone (2 tokens) == row 3 in the padded batch
        alone = mean(input_ids=ids[3:, :2], attention_mask=mask[3:, :2]).logits
        torch.testing.assert_close(alone, by_hand[3:], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(plain(input_ids=ids, attention_mask=mask).logits, by_hand)  # it is a change


def test_run_saves_it_and_every_loader_reads_it(tiny_model_dir, tiny_overrides, tmp_path, capsys):
    from safetensors.torch import load_file

    from sftlab.cli import main
    from sftlab.config import load_config
    from sftlab.eval.evaluate import load_trained
    from sftlab.export.runtime import load_exported
    from sftlab.models.pooling import pooling_of
    from sftlab.train.loop import train

    over = tiny_overrides + ["model.pooling=mean", "train.epochs=1", "train.tensorboard=false"]
    run = train(load_config(None, over))
    assert "first token only" not in capsys.readouterr().err  # the shortcut would drop the other positions
    best = run / "best"
    assert json.loads((best / "config.json").read_text())["sftlab_pooling"] == "mean"
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    saved = load_file(str(best / "model.safetensors"))
    for k in ("pooler.dense.weight", "pooler.dense.bias"):  # never read, so frozen: as loaded
        torch.testing.assert_close(saved[f"bert.{k}"], start[k])
    model, tok, meta = load_trained(run, device="cpu")
    assert pooling_of(model) == "mean"
    texts = ["the film was great", "the meal was awful and the hotel was ugly too"]
    with torch.inference_mode():
        want = model(**tok(texts, padding=True, return_tensors="pt")).logits.numpy()
    np.testing.assert_allclose(load_exported(best).logits(texts), want, atol=1e-5, rtol=0)
    from sftlab.serve.backend import load_backend

    served = load_backend(run)  # the server's own loader (its first-token shortcut must stay off)
    got = served.predict([(t, None) for t in texts])
    assert [p["label"] for p in got] == [meta["labels"][i] for i in want.argmax(-1)]
    probs = torch.softmax(torch.from_numpy(want), -1).max(-1).values.tolist()
    assert [p["score"] for p in got] == pytest.approx(probs, abs=1e-5)
    for fmt in ("hf", "onnx"):  # export's own parity check compares with the run; and here, once more
        out = tmp_path / fmt
        assert main(["export", str(run), "--format", fmt, "--out", str(out)]) == 0
        np.testing.assert_allclose(load_exported(out).logits(texts), want, atol=1e-4, rtol=0)
    assert "pooling: mean" in capsys.readouterr().err  # the hf folder's note for plain-transformers users


def test_adapter_run_records_it_for_its_base(tiny_overrides):
    from sftlab.config import load_config
    from sftlab.eval.evaluate import load_trained
    from sftlab.models.pooling import pooling_of
    from sftlab.train.loop import train

    run = train(load_config(None, tiny_overrides + ["model.pooling=mean", "strategy.name=lora", "train.epochs=1",
                                                    "train.tensorboard=false"]))
    assert json.loads((run / "best" / "sftlab.json").read_text())["pooling"] == "mean"
    model, _, _ = load_trained(run, device="cpu")
    assert pooling_of(model) == "mean"


def test_a_task_without_a_first_token_head_is_one_line(tiny_overrides):
    from sftlab.config import load_config
    from sftlab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.pooling: mean feeds a classification or regression head"):
        load_config(None, tiny_overrides + ["task=masked_lm", "model.pooling=mean"])
