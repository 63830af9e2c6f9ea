"""Shared fixtures: a tiny random BERT (2 layers) saved as an HF folder, and small data files."""
from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
from pathlib import Path

import pytest

import sftlab  # noqa: F401  (first: names DeepSpeed's accelerator before anything imports accelerate; __init__.py)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SFTLAB_SHARED_DATA", REPO.parent / "shared" / "data"))

POS = ["great", "lovely", "excellent", "wonderful", "superb", "fine", "good", "brilliant"]
NEG = ["awful", "terrible", "bad", "horrible", "dreadful", "poor", "boring", "ugly"]
NOUNS = ["film", "meal", "book", "phone", "hotel", "song", "show", "game"]


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models gain nothing from threads, and two spin against each other on a busy 2-core box (2x slower).
    Use per module: `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_bert(out: Path, hidden: int, seed: int, dropout: float = 0.0) -> Path:
    """A 2-layer BERT of this width (2 heads, no dropout unless given) with the packaged minilm tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from sftlab.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("minilm-l6"))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=128, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout)
    torch.manual_seed(seed)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT with the packaged minilm tokenizer: same code path as real models, ~1M params."""
    return _tiny_bert(tmp_path_factory.mktemp("tiny-bert"), 32, seed=0)


@pytest.fixture(scope="session")
def wide_model_dir(tmp_path_factory) -> Path:
    """tiny_model_dir's twin 48 wide (same tokenizer, layers and heads): a teacher whose hidden states need a
    projection from a tiny student's."""
    return _tiny_bert(tmp_path_factory.mktemp("wide-bert"), 48, seed=1)


def model_pair(model_dir, task="classification", attention="sdpa"):
    """Two identical loads of a classifier (same head weights), to patch one and compare it with the other."""
    from sftlab.models import load_model

    labels = None if task == "regression" else ["neg", "pos", "mid"]
    a = load_model(str(model_dir), task, labels, attention=attention, seed=0)
    b = load_model(str(model_dir), task, labels, attention=attention, seed=0)
    b.load_state_dict(a.state_dict())
    return a, b


def padded_batch():
    """(input_ids, attention_mask) of 4 rows x 11 tokens, row 1 padded after 7 tokens, row 3 after 2."""
    import torch

    ids = torch.randint(5, 1000, (4, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[3, 2:] = 0
    return ids, mask


def assert_same_logits_and_grads(reference, patched) -> None:
    """On a padded batch in train mode (the tiny model has no dropout, so it is deterministic): logits equal and every
    parameter's gradient equal (or absent on both)."""
    import torch

    ids, mask = padded_batch()
    for m in (reference, patched):
        m.train()
        m(input_ids=ids, attention_mask=mask).logits.pow(2).sum().backward()
    torch.testing.assert_close(patched(input_ids=ids, attention_mask=mask).logits,
                               reference(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(reference.named_parameters(), patched.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def best_weights_per_setting(overrides: list[str], tmp_path: Path, key: str, values: list[str]) -> list[dict]:
    """Train once per `key=value` (one epoch, in-process, through `sftlab.train` as users call it) and return each
    run's best/ weights."""
    from safetensors.torch import load_file

    import sftlab

    out = []
    for value in values:
        cfg = sftlab.load_config(None, overrides + ["train.epochs=1", f"{key}={value}", f"output_dir={tmp_path / value}"])
        out.append(load_file(str(sftlab.train(cfg) / "best" / "model.safetensors")))
    return out


def make_rows(n: int, seed: int = 0, labels=("negative", "positive")) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        y = i % 2
        words = [rng.choice(NOUNS), "was", rng.choice(POS if y else NEG)] + rng.choices(NOUNS, k=rng.randint(0, 6))
        rows.append({"text": "the " + " ".join(words), "label": labels[y]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def toy_data(tmp_path) -> dict:
    """64 train / 32 dev sentiment rows as JSONL."""
    return {"train": str(write_jsonl(tmp_path / "train.jsonl", make_rows(64))),
            "dev": str(write_jsonl(tmp_path / "dev.jsonl", make_rows(32, seed=1)))}


@pytest.fixture
def tiny_overrides(tiny_model_dir, toy_data, tmp_path) -> list[str]:
    """Overrides for a fast, deterministic fp32 run of the tiny model on the toy data."""
    return [f"model.name={tiny_model_dir}", f"data.train={toy_data['train']}", f"data.dev={toy_data['dev']}",
            "train.epochs=2", "train.batch_size=8", "train.lr=1e-3", "train.precision=fp32", "train.progress=false",
            f"output_dir={tmp_path / 'run'}"]


CHAT_WORDS = ("hello there good morning translate to french how are you today the weather is nice sure here is an "
              "answer please tell me about cats and dogs they sleep a lot bonjour thanks positive negative").split()


def train_bpe_tokenizer(trim_offsets: bool = False, words=CHAT_WORDS, vocab_size: int = 400):
    """A real byte-level BPE (GPT-2 style) trained in-process on a few hundred sentences, with ChatML tokens
    and no chat template (so sftlab's ChatML fallback renders)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [" ".join(rng.choices(words, k=12)).capitalize() + "." for _ in range(400)]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    # trim_offsets=True is GPT-2's setting: " Hello" gets offsets without its space, " " becomes zero-width.
    tk.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    tk.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama with an in-process byte-level BPE tokenizer, saved as an HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_bpe_tokenizer()
    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_chats(n: int, seed: int = 0) -> list[dict]:
    """Sentiment as chat: the assistant answers positive/negative."""
    rows = make_rows(n, seed)
    return [{"messages": [{"role": "user", "content": f"Is this positive or negative? {r['text']}"},
                          {"role": "assistant", "content": r["label"]}]} for r in rows]


def crash_after_checkpoint(monkeypatch, *, step: int | None = None, calls: int | None = None):
    """The loop raises KeyboardInterrupt right after saving a checkpoint: the one at `step`, or the `calls`-th.
    Returns the real save function (monkeypatch it back before resuming)."""
    import sftlab.train.loop as loop

    real, seen = loop.save_checkpoint, {"n": 0}

    def crash(run_dir, at, *a, **k):
        out = real(run_dir, at, *a, **k)
        seen["n"] += 1
        if at == step or seen["n"] == calls:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(loop, "save_checkpoint", crash)
    return real


@contextlib.contextmanager
def postgres_server(initdb: str):
    """A throw-away PostgreSQL server on a free loopback port: initdb into a temporary folder, pg_ctl start, yield
    its URL, stop and remove it. Root (CI) runs the server as `postgres`, which initdb requires. Also used by
    benchmarks/search_workers.py."""
    import shutil
    import socket
    import tempfile

    pg_ctl = str(Path(initdb).with_name("pg_ctl"))
    root = Path(tempfile.mkdtemp(prefix="sftlab-pg-"))  # not under pytest's 0700 tmp: the server user reads it
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    try:
        subprocess.run([*as_user, initdb, "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync"],
                       check=True, capture_output=True)
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                        f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                       check=True, capture_output=True)
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def find_initdb() -> str | None:
    import glob
    import shutil

    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return bins[-1] if bins else shutil.which("initdb")


@pytest.fixture(scope="session")
def postgres_url():
    """A throw-away PostgreSQL server for the session (postgres_server). Skips without Debian's `postgresql`
    package, fails under CI=true (scripts/test.sh installs it)."""
    initdb = find_initdb()
    if not initdb:
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL is not installed (apt-get install postgresql); scripts/test.sh installs it")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    with postgres_server(initdb) as url:
        yield url
