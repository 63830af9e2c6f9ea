"""Strategies as invariants on the tiny BERT (classification) and tiny Llama (causal LM).

Each case trains 3 steps in-process, once per module (`runs`), with `apply_strategy` spied on: the snapshot
right after the strategy applied is the initial model, the plan's model after `train` returns is the final
one. What trains is checked against name rules and parameter counts written here from the configs, not
read back from the code under test.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sftlab.train.loop as loop
from sftlab.config import StrategyConfig, TrainConfig
from sftlab.config import load_config as _load_config
from sftlab.errors import ConfigError
from sftlab.eval.evaluate import load_trained
from sftlab.models import load_model
from sftlab.strategies import Context, apply_strategy, layer_scale
from sftlab.train.optim import build_optimizer
from tests.conftest import crash_after_checkpoint, make_chats, make_rows, write_jsonl

# One torch thread: tiny models gain nothing from more, and two threads spin against each other on a busy box.
FAST = ["train.max_steps=3", "train.batch_size=8", "train.lr=1e-2", "train.precision=fp32", "train.progress=false",
        "train.num_threads=1", "strategy.r=4", "strategy.num_virtual_tokens=4", "strategy.reduction=4", "strategy.k=1"]
R, N_VIRTUAL, REDUCTION, STEPS = 4, 4, 4, 3


def lora_r(strategy: str) -> dict:
    return {"r": R} if strategy in ("lora", "dora") else {}


def load_config(path, overrides):
    """FAST sets every strategy's options at once; each run keeps those of its own strategy (as `sftlab compare`)."""
    return _load_config(path, overrides, foreign_options=True)

PEFT = ("lora", "dora", "prompt_tuning", "prefix_tuning")
SMALL = PEFT + ("adapter",)

ENC = ["full", "llrd", "ffn_only", "top_k_layers", "head_only", "head_only:mlp", "bitfit", *SMALL, "adapter:pfeiffer"]
DEC = ["full", "llrd", "ffn_only", "top_k_layers", "head_only", *SMALL, "adapter:pfeiffer"]
CASES = [("enc", s) for s in ENC] + [("dec", s) for s in DEC]
SUB = {"head_only:mlp": "strategy.head=mlp", "adapter:pfeiffer": "strategy.adapter_type=pfeiffer"}


@dataclass
class Run:
    dir: Path = None
    model: torch.nn.Module = None  # the in-memory model when `train` returned
    init: dict = None  # every parameter right after the strategy applied
    trainable: set = None  # names with requires_grad right after the strategy applied
    optimizer: torch.optim.Optimizer = None
    stages: dict = field(default_factory=dict)  # step -> (names training in it, parameters before it)

    @property
    def n_trainable(self) -> int:
        return sum(self.init[n].numel() for n in self.trainable)


def run_spied(overrides: list[str], out: Path, **kw) -> Run:
    rec, real_apply, real_opt = Run(), loop.apply_strategy, loop.build_optimizer

    def spy_apply(model, cfg, ctx):
        plan = real_apply(model, cfg, ctx)
        rec.model = plan.model
        rec.init = {n: p.detach().cpu().clone() for n, p in plan.model.named_parameters()}
        rec.trainable = {n for n, p in plan.model.named_parameters() if p.requires_grad}
        if plan.on_step:  # gradual unfreezing: record each step's trainable set and the weights before it
            inner = plan.on_step

            def on_step(step):
                inner(step)
                ps = list(plan.model.named_parameters())
                weights = {n: p.detach().cpu().clone() for n, p in ps}
                rec.stages[step] = ({n for n, p in ps if p.requires_grad}, weights)

            plan.on_step = on_step
        return plan

    def spy_opt(*a, **k):
        rec.optimizer = real_opt(*a, **k)
        return rec.optimizer

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "apply_strategy", spy_apply)
        mp.setattr(loop, "build_optimizer", spy_opt)
        rec.dir = loop.train(load_config(None, overrides + [f"output_dir={out}"]), **kw)
    return rec


@pytest.fixture(scope="module", autouse=True)
def _restore_threads():
    """`train.num_threads` sets torch's global thread count; give the rest of the session its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(tiny_model_dir, tiny_llama_dir, tmp_path_factory) -> dict:
    """Base overrides per model kind: no dev set, so RUN_DIR/best is the model of the last step."""
    root = tmp_path_factory.mktemp("strategy-data")
    # max_length 96: prompt tuning's virtual tokens must fit the tiny BERT's 128 positions
    return {"enc": [f"model.name={tiny_model_dir}", f"data.train={write_jsonl(root / 'cls.jsonl', make_rows(16))}",
                    "data.max_length=96"],
            "dec": ["task=causal_lm", f"model.name={tiny_llama_dir}", "data.max_length=96",
                    f"data.train={write_jsonl(root / 'chat.jsonl', make_chats(16))}"]}


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """runs(kind, strategy, *overrides) -> Run, trained once per module."""
    root, cache = tmp_path_factory.mktemp("strategy-runs"), {}

    def get(kind: str, strategy: str, *extra: str) -> Run:
        key = (kind, strategy, extra)
        if key not in cache:
            name = strategy.split(":")[0]
            over = data[kind] + FAST + [f"strategy.name={name}"] + ([SUB[strategy]] if strategy in SUB else [])
            cache[key] = run_spied(over + list(extra), root / f"{kind}-{strategy}-{len(cache)}".replace(":", "-"))
        return cache[key]

    return get


def model_config(run: Run):
    m = run.model.get_base_model() if hasattr(run.model, "get_base_model") else run.model
    return m.config


# --- expectations, from name rules and the model configs -----------------------------------------------------
# enc: bert.embeddings.*, bert.encoder.layer.{0,1}.*, bert.pooler.dense.*, classifier.*
# dec: model.embed_tokens.*, model.layers.{0,1}.*, model.norm.*, lm_head.*
TOP = {"enc": r"bert\.pooler\.", "dec": r"model\.norm\."}
HEAD = {"enc": r"classifier\.", "dec": r"lm_head\."}
BLOCK = {"enc": r"bert\.encoder\.layer\.(\d+)\.", "dec": r"model\.layers\.(\d+)\."}
FFN = {"enc": r"(intermediate|output)\.", "dec": r"mlp\."}  # block-relative (BERT's attention.output is not FFN)
RULES = {  # strategy -> regex of the parameters that train (top and head always, except for the linear probe)
    "full": ".", "llrd": ".", "head_only": "{head}", "head_only:mlp": "{top}|{head}",
    "ffn_only": "{block}{ffn}|{top}|{head}", "top_k_layers": r"{last}|{top}|{head}", "bitfit": r".*\.bias$|{head}",
    "adapter": r"sftlab_adapters\.|{top}|{head}", "adapter:pfeiffer": r"sftlab_adapters\.|{top}|{head}",
}


def head_rule(kind: str, strategy: str) -> str:
    # a decoder's lm_head is pretrained, not a task head: only head_only (and full) train it
    return HEAD[kind] if kind == "enc" or strategy.startswith("head_only") else "(?!)"


def expected_names(kind: str, strategy: str, names) -> set[str]:
    last = BLOCK[kind].replace(r"(\d+)", "1")  # strategy.k=1 of 2 blocks
    rule = RULES[strategy].format(top=TOP[kind], head=head_rule(kind, strategy), block=BLOCK[kind], ffn=FFN[kind],
                                  last=last)
    return {n for n in names if re.match(rule, n)}


def linear_shapes(kind: str, c) -> list[tuple[int, int]]:
    """(in, out) of every linear layer lora's all-linear adapts: everything but the output layer."""
    h, i, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    if kind == "enc":  # query key value attention.output, intermediate, output per block; the pooler
        return [(h, h)] * 4 * L + [(h, i), (i, h)] * L + [(h, h)]
    kv = c.num_key_value_heads * h // c.num_attention_heads  # q k v o gate up down
    return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)] * L


def expected_count(kind: str, strategy: str, run: Run) -> int:
    c = model_config(run)
    h, L = c.hidden_size, c.num_hidden_layers
    head = h * 2 + 2 if kind == "enc" else 0  # peft saves the new classifier (2 labels); a decoder's lm_head stays
    if strategy in ("lora", "dora"):
        shapes = linear_shapes(kind, c)
        return head + sum(R * (a + b) + (b if strategy == "dora" else 0) for a, b in shapes)  # dora: magnitudes
    if strategy == "prompt_tuning":
        return head + N_VIRTUAL * h
    if strategy == "prefix_tuning":  # a key and a value vector per virtual token per layer
        kv = getattr(c, "num_key_value_heads", c.num_attention_heads) * h // c.num_attention_heads
        return head + N_VIRTUAL * L * 2 * kv
    if strategy.startswith("adapter"):  # down (h -> h/reduction) + up, after attention (houlsby) and FFN
        b = h // REDUCTION
        per_block = 1 if strategy.endswith("pfeiffer") else 2
        own = {n for n in run.init if re.match(f"{TOP[kind]}|{head_rule(kind, strategy)}", n)}
        return L * per_block * (h * b + b + b * h + h) + sum(run.init[n].numel() for n in own)
    return sum(run.init[n].numel() for n in expected_names(kind, strategy, run.init))


def fixed_batch(kind: str, tokenizer) -> dict:
    texts = ["the film was great", "the meal was awful and the hotel boring"] if kind == "enc" else \
        ["Hello there, how are you today?", "Tell me about cats"]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask")}


def device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    model.eval()
    return model(**{k: v.to(device_of(model)) for k, v in batch.items()}).logits.cpu()


def ids(cases):
    return [f"{k}-{s}" for k, s in cases]


# --- 1. what trains ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,strategy", CASES, ids=ids(CASES))
def test_trains_exactly_what_the_strategy_names(runs, kind, strategy):
    run = runs(kind, strategy)
    final = {n: p.detach().cpu() for n, p in run.model.named_parameters()}
    assert final.keys() == run.init.keys()
    changed = {n for n, p in final.items() if not torch.equal(p, run.init[n])}
    assert changed == run.trainable, (f"trainable but unchanged: {sorted(run.trainable - changed)[:4]}; "
                                      f"frozen but changed: {sorted(changed - run.trainable)[:4]}")
    assert run.n_trainable == expected_count(kind, strategy, run)
    if strategy.split(":")[0] in PEFT:  # peft's own parameters (and the head's trainable copy), nothing of the base
        assert all(re.search(r"lora_|modules_to_save|prompt_encoder", n) for n in run.trainable)
    else:
        assert run.trainable == expected_names(kind, strategy, run.init)


# --- 2. RUN_DIR/best reloads to the model that trained ---------------------------------------------------------
RELOAD = CASES + [("enc", "gradual_unfreezing"), ("dec", "gradual_unfreezing")]


@pytest.mark.parametrize("kind,strategy", RELOAD, ids=ids(RELOAD))
def test_best_reloads_to_the_same_logits(runs, kind, strategy):
    run = runs(kind, strategy)
    model, tokenizer, meta = load_trained(run.dir, device=device_of(run.model))
    assert meta["step"] == STEPS and meta["strategy"] == strategy.split(":")[0]
    batch = fixed_batch(kind, tokenizer)
    a, b = logits(run.model, batch), logits(model, batch)
    assert a.shape == b.shape and (a - b).abs().max().item() <= 1e-6


# --- 3. adapters save what trained, and only that --------------------------------------------------------------
@pytest.mark.parametrize("kind", ["enc", "dec"])
@pytest.mark.parametrize("strategy", SMALL)
def test_adapters_save_small(runs, kind, strategy):
    run, full = runs(kind, strategy), runs(kind, "full")
    best = run.dir / "best"
    assert not (best / "model.safetensors").exists()
    saved = load_file(str(best / "adapter_model.safetensors"))
    assert sum(t.numel() for t in saved.values()) == run.n_trainable  # no frozen base weight in the folder
    if kind == "enc":  # the trained classifier travels with the adapter
        assert any("classifier" in k for k in saved)
    # the tiny Llama is 29% lm_head, which `adapter` trains as the head
    size = (best / "adapter_model.safetensors").stat().st_size
    ratio = size / (full.dir / "best" / "model.safetensors").stat().st_size
    assert ratio < (0.01 if kind == "enc" else 0.4)


@pytest.mark.parametrize("strategy", ["lora", "adapter"])
def test_adapter_run_reloads_from_another_directory(tiny_model_dir, data, tmp_path, monkeypatch, strategy):
    """`model.name` relative to the working directory: RUN_DIR/best must still find its base from elsewhere."""
    monkeypatch.chdir(tiny_model_dir.parent)
    over = [f"model.name={tiny_model_dir.name}"] + data["enc"][1:] + FAST + [f"strategy.name={strategy}"]
    run_dir = loop.train(load_config(None, over + [f"output_dir={tmp_path / 'run'}"]))
    monkeypatch.chdir(tmp_path)
    _, _, meta = load_trained(run_dir, device="cpu")
    assert Path(meta["base_path"]).is_absolute()


# --- 4. LoRA/DoRA merge into the base without changing the function ---------------------------------------------
@pytest.mark.parametrize("kind", ["enc", "dec"])
@pytest.mark.parametrize("strategy", ["lora", "dora"])
def test_merged_equals_unmerged(runs, kind, strategy):
    model, tokenizer, _ = load_trained(runs(kind, strategy).dir, device="cpu")
    batch = fixed_batch(kind, tokenizer)
    before = logits(model, batch)
    merged = model.merge_and_unload()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert (logits(merged, batch) - before).abs().max().item() <= 1e-5


# --- 5. gradient checkpointing with a frozen embedding still sends gradients through every block ---------------
GC = [(k, s) for k in ("enc", "dec") for s in ("lora", "top_k_layers", "adapter", "prompt_tuning")]


@pytest.mark.parametrize("kind,strategy", GC, ids=ids(GC))
def test_gradient_checkpointing_gives_the_same_weights(runs, kind, strategy):
    plain, ckpt = runs(kind, strategy), runs(kind, strategy, "train.gradient_checkpointing=true")
    a, b = ({n: p.detach().cpu() for n, p in r.model.named_parameters()} for r in (plain, ckpt))
    assert any(getattr(m, "gradient_checkpointing", False) for m in ckpt.model.modules())
    assert ckpt.trainable == plain.trainable
    assert all(not torch.equal(b[n], ckpt.init[n]) for n in ckpt.trainable)
    assert max((a[n] - b[n]).abs().max().item() for n in a) <= 1e-6


# --- 6. gradual unfreezing: stages, untouched until joined, per-parameter AdamW steps, exact resume ------------
def test_gradual_unfreezing_stages(runs):
    """unfreeze_every=2 on 2 blocks: steps 0-1 head + pooler, 2-3 + top block, 4-5 + both, 6-7 + embeddings."""
    run = runs("enc", "gradual_unfreezing", "strategy.unfreeze_every=2", "train.max_steps=8", "train.eval_every=3")
    names = list(run.init)
    parts = [r"classifier\.|bert\.pooler\.", r"bert\.encoder\.layer\.1\.", r"bert\.encoder\.layer\.0\.",
             r"bert\.embeddings\."]  # in the order they join
    joins = {n: 2 * next(i for i, rule in enumerate(parts) if re.match(rule, n)) for n in names}  # step it joins
    assert sorted(run.stages) == list(range(8))
    for step, (training, before) in run.stages.items():
        assert training == {n for n in names if joins[n] <= step}, f"step {step}"
        assert all(torch.equal(before[n], run.init[n]) for n in names if joins[n] >= step), f"step {step}"
    final = dict(run.model.named_parameters())
    assert all(not torch.equal(final[n].cpu(), run.init[n]) for n in names)
    # AdamW counts each parameter's own steps: its bias correction starts when it joins, not at step 0
    assert {n: int(run.optimizer.state[p]["step"]) for n, p in final.items()} == {n: 8 - j for n, j in joins.items()}


RESUME = [("enc", "gradual_unfreezing"), ("dec", "adapter"), ("enc", "prompt_tuning")]


@pytest.mark.parametrize("kind,strategy", RESUME, ids=ids(RESUME))
def test_resume_equals_uninterrupted(data, tmp_path, monkeypatch, kind, strategy):
    over = data[kind] + FAST + [f"strategy.name={strategy}", "strategy.unfreeze_every=2", "train.max_steps=8",
                                "train.eval_every=3"]
    ref = loop.train(load_config(None, over + [f"output_dir={tmp_path / 'ref'}"]))
    real = crash_after_checkpoint(monkeypatch, step=3)
    cfg = load_config(None, over + [f"output_dir={tmp_path / 'part'}"])
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg)
    monkeypatch.setattr(loop, "save_checkpoint", real)
    loop.train(cfg, resume=tmp_path / "part")

    def last(d):
        return load_file(str(sorted((d / "checkpoints").glob("step-*"))[-1] / "model.safetensors"))

    wa, wb = last(ref), last(tmp_path / "part")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# --- 7. layer-wise LR decay: lr x decay^(L + 1 - layer id), for any strategy -------------------------------------
def depth(name: str) -> int:
    """0 embeddings, i + 1 block i (adapters are keyed by module path with "__" for "."), 3 above the 2 blocks."""
    m = re.search(r"layers?(?:\.|__)(\d+)(?:\.|__)", name)
    return int(m.group(1)) + 1 if m else 0 if "embed" in name else 3


def fresh(kind: str, path: Path):
    task = "classification" if kind == "enc" else "causal_lm"
    return load_model(str(path), task, ["negative", "positive"] if kind == "enc" else None), task


@pytest.mark.parametrize("kind", ["enc", "dec"])
@pytest.mark.parametrize("strategy", ["full", "lora", "adapter"])
def test_layer_decay_scales_lr_by_depth(tiny_model_dir, tiny_llama_dir, kind, strategy):
    model, task = fresh(kind, tiny_model_dir if kind == "enc" else tiny_llama_dir)
    plan = apply_strategy(model, StrategyConfig(name=strategy, layer_decay=0.5, **lora_r(strategy)), Context(task))
    opt = build_optimizer(plan.model, TrainConfig(lr=1.0), layer_scale(plan, 0.5))
    lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    params = list(plan.model.named_parameters())
    assert {id(p) for _, p in params if p.requires_grad} == set(lr)  # frozen parameters stay out
    assert {n: lr[id(p)] for n, p in params if p.requires_grad} == \
        {n: 0.5 ** (3 - depth(n)) for n, p in params if p.requires_grad}
    if strategy == "full":  # embeddings lowest, each block higher, head the full lr
        assert sorted(set(lr.values())) == [0.125, 0.25, 0.5, 1.0]


def test_llrd_trains_with_decay_0_8(runs):
    groups = runs("enc", "llrd").optimizer.param_groups
    assert sorted({round(g["initial_lr"] / 1e-2, 9) for g in groups}) == [round(0.8 ** k, 9) for k in (3, 2, 1, 0)]


# --- a fresh lora/dora/adapter model computes exactly what its base does ------------------------------------------
@pytest.mark.parametrize("kind", ["enc", "dec"])
@pytest.mark.parametrize("strategy", ["lora", "dora", "adapter"])
def test_fresh_adapter_is_the_base_function(tiny_model_dir, tiny_llama_dir, kind, strategy):
    from sftlab.models import load_tokenizer

    path = tiny_model_dir if kind == "enc" else tiny_llama_dir
    model, task = fresh(kind, path)
    batch = fixed_batch(kind, load_tokenizer(str(path)))
    before = logits(model, batch)
    plan = apply_strategy(model, StrategyConfig(name=strategy, **lora_r(strategy)), Context(task))
    assert (logits(plan.model, batch) - before).abs().max().item() <= 1e-6


# --- 8. configuration errors name the key and a fix ----------------------------------------------------------------
def test_k_beyond_the_block_count(data, tmp_path):
    over = data["enc"] + FAST + ["strategy.name=top_k_layers", "strategy.k=3", f"output_dir={tmp_path}"]
    cfg = load_config(None, over)  # the block count is the model's: known when the strategy applies
    with pytest.raises(ConfigError, match=r"^strategy\.k: 3 but the model has 2 blocks; choose 1\.\.2"):
        loop.train(cfg)


def test_unknown_strategy_suggests_the_closest(data):
    with pytest.raises(ConfigError, match=r"^strategy\.name: unknown strategy 'lroa'\. Did you mean 'lora'\?"):
        load_config(None, data["enc"] + ["strategy.name=lroa"])


def test_prompt_tuning_must_fit_the_positions(data, tmp_path):
    cfg = load_config(None, data["enc"] + ["strategy.name=prompt_tuning", "data.max_length=120",
                                           "strategy.num_virtual_tokens=16", f"output_dir={tmp_path / 'r'}"])
    with pytest.raises(ConfigError, match=r"^strategy.num_virtual_tokens: 16 virtual tokens \+ data.max_length 120 "
                                          r"exceed the model's 128 positions"):
        loop.train(cfg)


@pytest.mark.parametrize("strategy", ["prompt_tuning", "prefix_tuning"])
def test_prompt_learning_refuses_packing(data, strategy):
    with pytest.raises(ConfigError, match=f"^strategy.name {strategy} cannot train on packed rows; "
                                          "set data.packing=false$"):
        load_config(None, data["dec"] + [f"strategy.name={strategy}", "data.packing=true"])


DECODER_ERRORS = {  # the fixture's Llama: no biases, an untied lm_head, a final norm but no pooler
    "bitfit": ({}, r"^strategy\.name: bitfit: LlamaForCausalLM has no bias terms .*; use lora or top_k_layers$"),
    "head_only-tied": ({"tie_word_embeddings": True},
                       r"^strategy\.name: head_only: .*tied to the input embeddings\); use top_k_layers, ffn_only"),
    "head_only-mlp": ({}, r"^strategy\.head: mlp needs a pooler .*LlamaForCausalLM lacks; use strategy\.head=linear$"),
}


@pytest.mark.parametrize("case", DECODER_ERRORS)
def test_decoder_without_biases_pooler_or_head(tiny_llama_dir, case):
    from transformers import AutoConfig, LlamaForCausalLM

    changes, message = DECODER_ERRORS[case]
    model = LlamaForCausalLM(AutoConfig.from_pretrained(tiny_llama_dir, **changes))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == bool(changes)
    name = case.split("-")[0]
    strategy = StrategyConfig(name=name, **({"head": "mlp" if case.endswith("mlp") else "linear"}
                                            if name == "head_only" else {}))
    with pytest.raises(ConfigError, match=message):
        apply_strategy(model, strategy, Context("causal_lm"))
