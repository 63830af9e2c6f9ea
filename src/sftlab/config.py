"""Typed run config: YAML + `key.sub=value` overrides, validated at load (litgpt's `args.py` style).

Every field is documented where it is declared; unknown keys, wrong types and impossible combinations fail at
load with the key's dotted name and a fix.

Past 500 lines on purpose: the fields' docstrings are the reference docs of every key (README points here), read
top to bottom like litgpt's args.py, and the sections' cross-checks (RunConfig._check) need them all in view. Leaf
options live with their leaves (strategies/, objectives/).
"""
from __future__ import annotations

import difflib
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from .errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class ModelConfig(_Section):
    name: str = "minilm-l6"
    """Packaged model name (`minilm-l6`), a local HF folder, or a hub id (needs a network)."""
    from_scratch: bool = False
    """Same architecture and tokenizer, randomly initialised weights (the from-scratch baseline)."""
    trust_remote_code: bool = False
    """Allow code shipped with a hub model to run. Off unless you trust the source."""
    keep_layers: list[int] | None = None
    """Blocks of `name` to keep, e.g. [1, 3, 5]: a shallower student initialised from them (DistilBERT), the
    embeddings and head as trained. Increasing, each in 0..blocks-1 (checked against the model at start)."""
    head_from: str | None = None
    """Fine-tuning after multitask: with model.name a multitask run's RUN_DIR/best, start this run's head from that
    run's head of this name (same kind and classes); unset, the head starts new and only the encoder carries over."""
    pooling: Literal["first", "mean"] | None = None
    """What the classification/regression head reads. first: the first token ([CLS]; BERT's pooler on it), the
    model's own head; mean: the attention-masked mean of the last hidden states, the sentence embedding
    sentence-transformers checkpoints such as minilm-l6 were trained for (models/pooling.py). Unset: what the
    model's folder was trained with (a run saved with mean keeps it), else first."""
    attention: Literal["auto", "eager", "sdpa"] = "auto"
    """Attention kernel for training. auto: transformers' default (sdpa); eager measured slower on the 2-core CPU
    SST-2 benchmark (docs/performance.md)."""


UNLABELLED_OBJECTIVES = ("distill", "mmd", "dann", "udalm", "gan_bert")  # objectives that read data.unlabelled


class AugmentConfig(_Section):
    """data.augment: new training rows made from each labelled row (data/eda.py), a pure function of (seed, row,
    copy). LM-written examples are a file instead: `sftlab data augment CONFIG --method lm` (docs/fewshot.md)."""

    name: str = "eda"
    """eda: synonym replacement, random insertion, swap and deletion (Wei & Zou 2019; WordNet from wordnet-base)."""
    copies: int = 4
    """Edited copies per row, added to the row itself (the paper: 16 below 500 rows per class, 4 above)."""
    alpha: float = 0.1
    """The rate of every operation unless set one by one below (fraction of words changed; 0.1 is the paper's)."""
    alpha_sr: float | None = None
    """Synonym replacement rate (default alpha)."""
    alpha_ri: float | None = None
    """Random insertion rate (default alpha)."""
    alpha_rs: float | None = None
    """Random swap rate (default alpha)."""
    p_rd: float | None = None
    """Random deletion probability per word (default alpha)."""
    seed: int = 0
    """Which edits: with the row's file line and the copy number, the whole of their randomness."""

    @model_validator(mode="after")
    def _check(self):
        if self.name != "eda":
            raise ValueError(f"data.augment.name: unknown augmenter {self.name!r}; available: eda (LM-written rows "
                             "come from `sftlab data augment CONFIG --method lm`, trained on as a file)")
        if self.copies < 1:
            raise ValueError(f"data.augment.copies must be >= 1, got {self.copies}")
        for key in ("alpha", "alpha_sr", "alpha_ri", "alpha_rs", "p_rd"):
            v = getattr(self, key)
            if v is not None and not 0 <= v <= 1:
                raise ValueError(f"data.augment.{key} must be in [0, 1], got {v}")
        for key in ("alpha_sr", "alpha_ri", "alpha_rs", "p_rd"):
            if getattr(self, key) is None:
                object.__setattr__(self, key, self.alpha)
        return self


class DataConfig(_Section):
    dir: str | None = None
    """Base folder for relative train/dev/test paths (env `SFTLAB_DATA_DIR` is used when this is unset)."""
    train: str | None = None
    """Training file (.csv .tsv .jsonl .json .parquet) or `hf:NAME[:CONFIG]:SPLIT` for a hub dataset."""
    dev: str | None = None
    """Evaluation file used during training (best checkpoint, early stopping)."""
    test: str | None = None
    """Optional held-out file evaluated once with the best model at the end."""
    unlabelled: str | list[str] | None = None
    """Text rows without labels (a label column is ignored), one file or a list, learned from the teacher's soft
    targets alone (objective distill; classification or regression). Drawn as a second stream with its own epochs."""
    unlabelled_text: str | int | None = None
    """Text column of the unlabelled files when it differs from `text` (e.g. `text` in reviews, `sentence` in SST-2)."""
    limit_unlabelled: int | None = None
    """Use only the first N valid unlabelled rows (over the files in order)."""
    text: str | int = "text"
    """Column with the (first) text: a name, or a 0-based index for headerless files."""
    text_pair: str | int | None = None
    """Column with the second text for sentence-pair tasks (NLI, paraphrase, STS)."""
    label: str | int = "label"
    """Column with the label (class name or id) or the regression target."""
    header: Literal["auto", True, False] = "auto"
    """CSV/TSV header row. auto: a header exists iff some column above is given by name."""
    labels: list[str] | None = None
    """Class names in id order. Default: sorted labels found in the training file (ints numerically)."""

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_as_text(cls, v):
        return [str(x) for x in v] if isinstance(v, (list, tuple)) else v

    @field_validator("labels")
    @classmethod
    def _labels_distinct(cls, v):
        if v is not None:
            twice = sorted({x for x in v if v.count(x) > 1})
            if twice:
                raise ValueError(f"data.labels names {', '.join(map(repr, twice))} more than once; each class once, "
                                 f"in id order")
            if len(v) < 2:
                raise ValueError(f"data.labels needs at least 2 classes, got {v}")
        return v
    limit_train: int | None = None
    """Use only the first N valid training rows (file order)."""
    limit_dev: int | None = None
    """Use only the first N valid dev rows."""
    max_length: int = 128
    """Tokens per example after truncation; truncated examples are counted and reported."""
    skip_invalid: bool = False
    """false: the first bad row stops the run with file:line. true: bad rows are skipped and counted."""
    format: Literal["auto", "alpaca", "prompt_completion", "messages", "sharegpt", "text"] = "auto"
    """causal_lm row format: alpaca (instruction/input/output or instances), prompt/completion, chat `messages`,
    ShareGPT `conversations`; `text`: raw text (data.text column, or a .txt file with one text per line) for
    continued pre-training, loss on every token, long texts cut into max_length pieces. auto: detected per row."""
    template: str | None = None
    """causal_lm: null = the tokenizer's chat template (ChatML when it has none); or a Jinja template file."""
    system_prompt: str | None = None
    """causal_lm: a system message put before conversations that have none."""
    train_on: Literal["assistant", "all", "last_turn"] = "assistant"
    """causal_lm loss: every assistant turn (default), all tokens, or only the last assistant turn."""
    overlength: Literal["truncate", "drop", "error"] = "truncate"
    """Examples longer than max_length: cut at max_length, drop them, or stop with file:line. Counted either way."""
    prompt: str | None = None
    """causal_lm from labelled columns: user-turn template with {column} fields, e.g. "Review: {sentence}"."""
    completion: str | None = None
    """causal_lm from labelled columns: assistant-turn template, e.g. "{label}" (label words via label_words)."""
    label_words: dict[str, str] | None = None
    """causal_lm from labelled columns: raw label -> word, e.g. {"0": negative, "1": positive}."""
    packing: bool = False
    """causal_lm: pack several examples into each max_length row (attention never crosses examples)."""
    dev_columns: dict[str, str | int] | None = None
    """Columns of the dev/test files where they differ from train's: keys text, text_pair, label (e.g. task
    embedding trained on raw text, judged on STS-B: {text: sentence1, text_pair: sentence2, label: score})."""
    mlm_probability: float = 0.15
    """masked_lm: fraction of non-special tokens chosen per epoch (80% masked, 10% random, 10% kept)."""
    whole_word_mask: bool = False
    """masked_lm: choose whole words (every piece of a chosen word) instead of single tokens."""
    augment: AugmentConfig | None = None
    """New training rows from each labelled row (after k_shot), e.g. {name: eda, copies: 4, alpha: 0.1}; the dev and
    test sets are never augmented."""
    k_shot: int | None = None
    """Few-shot protocol (classification): train on exactly K rows per class of data.train, drawn by k_shot_seed;
    the K-shot rows of a seed are inside its 2K-shot rows (docs/fewshot.md). null: every row."""
    k_shot_seed: int = 0
    """Which K-shot sample: a pure function of (seed, class), independent of train.seed."""
    k_shot_dev: int | None = None
    """A "true few-shot" dev set: K rows per class from data.train, never in any K-shot sample of the same seed,
    used instead of data.dev (which must then be unset; put the full dev file in data.test to score it once)."""

    @model_validator(mode="after")
    def _check(self):
        for key in ("limit_train", "limit_dev", "limit_unlabelled", "k_shot", "k_shot_dev"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ValueError(f"data.{key} must be >= 1 (or null for all rows), got {v}")
        if self.dev_columns is not None and not set(self.dev_columns) <= {"text", "text_pair", "label"}:
            bad = sorted(set(self.dev_columns) - {"text", "text_pair", "label"})
            raise ValueError(f"data.dev_columns: unknown key(s) {bad}; use text, text_pair and label")
        if not 0 < self.mlm_probability < 1:
            raise ValueError(f"data.mlm_probability must be in (0, 1) (0.15 is BERT's), got {self.mlm_probability}")
        if self.max_length < 8:
            raise ValueError(f"data.max_length must be >= 8, got {self.max_length}")
        return self


class StrategyConfig(_Section):
    name: str = "full"
    """How much of the model trains: full, ffn_only, top_k_layers, head_only, gradual_unfreezing, llrd, bitfit,
    lora, dora, prompt_tuning, prefix_tuning, adapter (docs/strategies.md). The task head always trains."""
    r: int = 16
    """lora/dora: rank of the update matrices."""
    alpha: float = 32
    """lora/dora: scaling numerator (update scaled by alpha / r)."""
    dropout: float = 0.05
    """lora/dora: dropout on the adapter input."""
    target_modules: str | list[str] = "all-linear"
    """lora/dora: module names to adapt, or all-linear (every linear layer but the output/head)."""
    k: int = 2
    """top_k_layers: how many of the last blocks train."""
    head: Literal["linear", "mlp"] = "linear"
    """head_only: linear probe, or mlp (also train the pooler between backbone and head: dense + tanh)."""
    layer_decay: float | None = None
    """Layer-wise LR decay for any strategy: block i of L gets lr x decay^(L - i), embeddings decay^(L + 1),
    the head the full lr. llrd uses 0.8 unless set. None: off."""
    unfreeze_every: int | None = None
    """gradual_unfreezing: optimizer steps between unfreezing one more block (default: one epoch's steps)."""
    num_virtual_tokens: int = 20
    """prompt_tuning/prefix_tuning: number of trained virtual tokens."""
    adapter_type: Literal["houlsby", "pfeiffer"] = "houlsby"
    """adapter: houlsby (after attention and feed-forward sublayers) or pfeiffer (after feed-forward only)."""
    reduction: int = 16
    """adapter: bottleneck width = hidden size / reduction."""

    @model_validator(mode="after")
    def _check(self):
        for key in sorted(self.model_fields_set):
            owners = STRATEGY_OPTIONS.get(key)
            if owners and self.name not in owners and getattr(self, key) != type(self).model_fields[key].default:
                raise ValueError(f"strategy.{key}: not an option of strategy {self.name} (it belongs to "
                                 f"{', '.join(owners)}); remove it, or set strategy.name to one of those")
        if self.r < 1:
            raise ValueError(f"strategy.r must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"strategy.dropout must be in [0, 1), got {self.dropout}")
        for key in ("k", "num_virtual_tokens", "reduction"):
            if getattr(self, key) < 1:
                raise ValueError(f"strategy.{key} must be >= 1, got {getattr(self, key)}")
        if self.unfreeze_every is not None and self.unfreeze_every < 1:
            raise ValueError(f"strategy.unfreeze_every must be >= 1 step, got {self.unfreeze_every}; "
                             "leave it unset for once per epoch")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"strategy.layer_decay must be in (0, 1], got {self.layer_decay}; 0.8 is typical")
        if self.name == "llrd" and self.layer_decay is None:
            self.layer_decay = 0.8
        return self


# Which strategies read each option (others ignore it, so setting it there is a mistake). layer_decay: all.
STRATEGY_OPTIONS = {
    "r": ("lora", "dora"), "alpha": ("lora", "dora"), "dropout": ("lora", "dora"), "target_modules": ("lora", "dora"),
    "k": ("top_k_layers",), "head": ("head_only",), "unfreeze_every": ("gradual_unfreezing",),
    "num_virtual_tokens": ("prompt_tuning", "prefix_tuning"), "adapter_type": ("adapter",), "reduction": ("adapter",),
}


class DistributedConfig(_Section):
    """train.distributed: how several processes (torchrun / accelerate launch) share the work; docs/distributed.md.
    One process ignores it."""

    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    """ddp: every process holds the whole model, gradients all-reduced (accelerate). fsdp: PyTorch FSDP2
    (`fully_shard`): parameters, gradients and optimizer state sharded across processes, each transformer block
    gathered for its own forward and backward (train/sharding.py). deepspeed: DeepSpeed's ZeRO engine, stage
    `zero_stage` (train/zero.py; needs the deepspeed package)."""
    wrap: list[str] | None = None
    """fsdp: the module classes sharded as units (default: the model's own `_no_split_modules`, its transformer
    block, e.g. BertLayer or LlamaDecoderLayer); the rest is sharded with the root."""
    cpu_offload: bool = False
    """fsdp and deepspeed: keep the sharded parameters, gradients and optimizer state in CPU memory (GPU runs short
    of memory); the optimizer steps on the CPU. (deepspeed: the optimizer's partitions, and under stage 3 the
    parameters too.)"""
    zero_stage: Literal[2, 3] | None = None
    """deepspeed: ZeRO stage 2 (optimizer state and gradients partitioned; default) or 3 (parameters too)."""

    @model_validator(mode="after")
    def _check(self):
        if self.strategy != "fsdp" and self.wrap is not None:
            raise ValueError("wrap is an fsdp setting; set strategy: fsdp or drop it")
        if self.strategy == "ddp" and self.cpu_offload:
            raise ValueError("cpu_offload is an fsdp / deepspeed setting; set strategy: fsdp or deepspeed, or drop it")
        if self.strategy != "deepspeed" and self.zero_stage is not None:
            raise ValueError("zero_stage is a deepspeed setting; set strategy: deepspeed or drop it")
        return self


class TrainConfig(_Section):
    epochs: float = 3
    """Passes over the training data (fractions allowed); ignored when max_steps is set."""
    max_steps: int | None = None
    """Stop after this many optimizer steps."""
    batch_size: int = 32
    """Examples per forward/backward pass per process (the micro-batch)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step: a step sees batch_size x grad_accum x processes examples."""
    micro_batch_tokens: int | Literal["auto"] | None = "auto"
    """Cut a micro-batch whose padded size (rows x longest row, in tokens) would exceed this into the fewest equal
    pieces within it (one may exceed it by less than a row): the few long examples then stop setting the run's peak
    activation memory. Same loss and gradient sums per step (float rounding and dropout draws aside). auto:
    batch_size x the 90th-percentile training-row length (SST-2 on minilm-l6: 864 tokens, peak RSS -90 MB at the
    same speed), and for decoders at most max(that length, 512) (packed smollm2 LoRA: the same speed at 2.4 GB
    peak RSS instead of 11.7 GB for the whole 8 x 512 batch); null: never cut."""
    pad_to_multiple_of: int | Literal["auto"] = "auto"
    """Round each batch's padded length up to a multiple of this. auto: 3 where bf16 autocast runs on a CPU, else 1.
    Why: oneDNN builds and caches kernels per bf16 matmul shape (~7 MB per batch shape, up to 1,024 kernels);
    dynamic padding's 44 batch shapes on SST-2 / minilm-l6 cost ~350 MB of peak RSS. Steps of 3 make 19 shapes
    for 8% more padded tokens (docs/performance.md). fp32 CPU matmuls (MKL) and CUDA keep no such cache."""
    eval_batch_size: int = 128
    """Examples per forward pass in evaluation and prediction. During training an evaluation batch also holds at
    most 4x the micro-batch token budget (no activations are kept for backward), so the dev pass does not set the
    run's peak memory."""
    lr: float = 5.0e-5
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay, never applied to biases and LayerNorm weights."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate decay after warmup."""
    warmup_ratio: float = 0.06
    """Fraction of all steps spent warming up linearly from 0 (ignored when warmup_steps is set)."""
    warmup_steps: int | None = None
    """Warmup length in optimizer steps."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this (null: no clipping)."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """bf16: autocast matmuls to bfloat16 (weights stay fp32), on CPU and GPU. fp32: no autocast. auto: bf16 where
    this machine's bf16 matmuls are measurably faster than fp32 (CUDA with bf16, CPUs with AMX), else fp32: some
    CPUs that list AVX-512 BF16 run bf16 matmuls at half the fp32 rate (src/sftlab/precision.py)."""
    seed: int = 0
    """Seeds weights of new layers, dropout and data order."""
    group_by_length: bool = True
    """Batch examples of similar length together (less padding), in a seeded random order."""
    eval_every: int | None = None
    """Evaluate on dev every N optimizer steps; null: at the end of each epoch."""
    metric: str | None = None
    """Dev metric that picks the best checkpoint: accuracy, macro_f1, mcc, pearson, spearman, loss."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without improvement of `metric` (null: never)."""
    keep_checkpoints: int = 1
    """Resumable checkpoints kept in the run directory (oldest pruned after a newer one is complete)."""
    log_every: int = 10
    """Write a line to metrics.jsonl every N optimizer steps."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: much less memory for ~30% more compute (long sequences, decoders)."""
    num_threads: int | None = None
    """torch intra-op threads (null: torch's default, one per core)."""
    progress: bool = True
    """Show a progress bar (loss, examples/s, ETA) on stderr."""
    lazy_embeddings: bool = True
    """Update only the word-embedding rows a step's batch touched (LazyAdam), with row-sparse embedding gradients
    in one process (no dense vocab x hidden gradient). Same dev accuracy on SST-2; speed effect within run-to-run
    noise with sdpa attention (docs/performance.md). Rows not seen keep their value and moments. false: AdamW."""
    first_token_last_layer: bool = True
    """Classifiers whose head reads only the first token ([CLS]; BERT, RoBERTa, ELECTRA): compute the last block for
    that token only (keys/values still see every token). Exact: same logits and gradients, ~14% fewer FLOPs on a
    6-block model. Applied only where a probe at load proves the patched model equal (docs/performance.md)."""
    fused_attention: bool = True
    """Encoders with BERT's self-attention layout: one QKV matmul and an attention core that keeps one copy of the
    probabilities (with a bool dropout mask drawn as in fast_dropout) instead of three. Same outputs and gradients
    to float rounding; applied only where a probe at load proves the patched model equal (docs/performance.md)."""
    fast_dropout: bool = True
    """CPU dropout masks drawn four per random word instead of one (`bernoulli_`): same keep probability (p rounded
    to 1/32768), ~2x cheaper forward + backward; equal to nn.Dropout in distribution, not draw for draw."""
    example_dropout: bool = False
    """Dropout masks as a function of (seed, step, example, site) instead of a random stream: an example gets the
    same masks in any batch, width or process, so 2 processes x batch 4 == 1 x batch 8 holds with dropout too
    (docs/distributed.md). Opt-in: a counter-based hash costs ~5x fast_dropout's mask per site. Encoders need
    train.fused_attention for their attention dropout; not with data.unlabelled."""
    tensorboard: bool = True
    """Write TensorBoard event files to RUN_DIR/tensorboard (`tensorboard --logdir RUN_DIR`)."""
    mlflow_uri: str | None = None
    """MLflow tracking URI (sqlite:///mlflow.db, http://host:5000): params, metrics and summary go there too."""
    mlflow_experiment: str = "sftlab"
    """MLflow experiment name (used when mlflow_uri is set)."""
    log_example_ids: bool = False
    """Append the training-example indices of every optimizer step to RUN_DIR/example_ids.jsonl (audits data
    order; a resumed run first drops the lines past its checkpoint, so the file reads as one straight run)."""
    max_bad_steps: int = 5
    """Steps with a non-finite loss or gradient norm are skipped (weights, optimizer and schedule untouched) and
    logged; this many in a row stop the run with an error."""
    auto_batch_size: bool = False
    """On out of memory, halve the micro-batch and double grad_accum (same examples per step) and retry the step;
    the size found is kept in checkpoints for resume. One process only."""
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    """Several processes: ddp (default) or fsdp, DistributedConfig above."""

    @model_validator(mode="after")
    def _check(self):
        positive = ("batch_size", "grad_accum", "eval_batch_size", "log_every", "keep_checkpoints", "max_bad_steps")
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if isinstance(self.pad_to_multiple_of, int) and self.pad_to_multiple_of < 1:
            raise ValueError(f"train.pad_to_multiple_of must be >= 1 or auto, got {self.pad_to_multiple_of}")
        if isinstance(self.micro_batch_tokens, int) and self.micro_batch_tokens < 1:
            raise ValueError(f"train.micro_batch_tokens must be >= 1, auto or null, got {self.micro_batch_tokens}")
        if self.epochs <= 0 and self.max_steps is None:
            raise ValueError("train.epochs must be > 0 (or set train.max_steps)")
        for key in ("max_steps", "eval_every", "num_threads", "warmup_steps", "early_stopping_patience"):
            v = getattr(self, key)
            least = 0 if key == "warmup_steps" else 1
            if v is not None and v < least:
                raise ValueError(f"train.{key} must be >= {least}, got {v}; leave it unset (null) for "
                                 + {"max_steps": "train.epochs to decide", "eval_every": "once per epoch",
                                    "num_threads": "one thread per core", "warmup_steps": "warmup_ratio",
                                    "early_stopping_patience": "no early stopping"}[key])
        if {"warmup_steps", "warmup_ratio"} <= self.model_fields_set and self.warmup_steps is not None \
                and self.warmup_ratio != type(self).model_fields["warmup_ratio"].default:
            raise ValueError(f"train.warmup_steps ({self.warmup_steps}) and train.warmup_ratio ({self.warmup_ratio}) "
                             f"are both set; keep one")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        return self


class TaskEntry(_Section):
    """One task of `task: multitask` (under `tasks.NAME`): its files and columns, read as a single-task run reads
    `data` (data.dir, max_length, skip_invalid and the rest come from `data`), plus its loss weight."""

    task: Literal["classification", "regression"] = "classification"
    """classification (single sentence or pair) or regression (one real target)."""
    train: str | None = None
    """Training file of this task (required)."""
    dev: str | None = None
    """Its dev file: scored every evaluation as NAME/metric, and in `mean`."""
    test: str | None = None
    text: str | int = "text"
    text_pair: str | int | None = None
    label: str | int = "label"
    labels: list[str] | None = None
    """Class names in id order (default: sorted labels of its training file)."""
    header: Literal["auto", True, False] = "auto"
    limit_train: int | None = None
    limit_dev: int | None = None
    weight: float = 1.0
    """Its loss is multiplied by this (an MSE and a cross-entropy are on different scales)."""
    metric: str | None = None
    """Its primary dev metric, averaged into `mean` (default: the task's first: accuracy, pearson), e.g. mcc for
    CoLA."""

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_as_text(cls, v):
        return [str(x) for x in v] if isinstance(v, (list, tuple)) else v

    @model_validator(mode="after")
    def _check(self):
        if self.train is None:
            raise ValueError("train is required (the task's training file)")
        if not self.weight >= 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")
        for key in ("limit_train", "limit_dev"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1 (or null for all rows)")
        if self.metric is not None:
            from .tasks import task_spec

            allowed = [m for m in task_spec(self.task).metrics if m != "loss"]
            if self.metric not in allowed:
                raise ValueError(f"metric {self.metric!r} does not fit task {self.task}; use one of {allowed}")
        if self.task == "regression" and self.labels is not None:
            raise ValueError("labels is for classification; remove it for task: regression")
        return self


class MixtureConfig(_Section):
    """How `task: multitask` draws each step's task (data/mixture.py): p_i proportional to n_i^(1/temperature)."""

    sampler: Literal["proportional", "temperature", "round_robin", "annealed"] = "proportional"
    """proportional (p ~ n_i: every row seen about equally often), temperature (p ~ n_i^(1/T): small tasks drawn
    more), round_robin (the tasks in turn), annealed (p ~ n_i^a, a from 1 to 0.2 over the run: Stickland & Murray
    2019)."""
    temperature: float | None = None
    """sampler temperature only: T (default 2.0); 1 is proportional, large T tends to uniform."""

    @model_validator(mode="after")
    def _check(self):
        if self.temperature is not None and self.sampler != "temperature":
            raise ValueError(f"temperature is an option of sampler temperature, not {self.sampler}; remove it or "
                             "set sampler: temperature")
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        return self


class MetaConfig(_Section):
    """meta: learn an initialisation that adapts to a new task from a few labels (train/meta_loop.py, docs/meta.md).
    The tasks are the `tasks:` entries of task: multitask (classification, two or more); each outer step draws
    `tasks_per_step` episodes, each adapted from the current weights by `inner_steps` SGD steps on its support set."""

    algorithm: Literal["reptile", "fomaml"] = "reptile"
    """reptile (Nichol et al. 2018: move towards the adapted weights) or fomaml (first-order MAML, Finn et al. 2017:
    the query-set gradient at the adapted weights, fed to AdamW)."""
    inner_steps: int = 5
    """SGD steps on an episode's support set (the whole set each step)."""
    inner_lr: float = 1.0e-3
    """The inner SGD learning rate."""
    outer_lr: float | None = None
    """reptile: the interpolation rate towards the mean adapted weights (default 1.0); fomaml: AdamW's learning rate
    (default train.lr)."""
    tasks_per_step: int = 4
    """Episodes per outer step (split across processes; their updates averaged)."""
    k_shot: int = 8
    """Support rows per class in an episode."""
    query: int = 8
    """fomaml: query rows per class (disjoint from the support set) for the outer gradient; reptile reads none."""
    episodes: int | None = None
    """The run's length in episodes instead of train.max_steps (outer steps = episodes / tasks_per_step, rounded
    up); set one of the two."""
    group_by: str | int | None = None
    """Instead of tasks: entries, task: classification with one data.train file whose column of this name (or
    index) splits the rows into the meta-training tasks (e.g. domain); one label set, so the head is meta-learned."""
    head_init: Literal["prototypes", "zeros"] = "prototypes"
    """Tasks whose label sets differ get a fresh head per episode: prototypes (Proto-MAML, Triantafillou et al. 2020:
    weight 2*mean feature of each class on the support set, bias -|mean|^2, so the first logits rank classes by
    distance to their mean) or zeros (uniform first predictions). Tasks sharing one label set meta-learn the head."""

    @model_validator(mode="after")
    def _check(self):
        for key in ("inner_lr", "tasks_per_step", "k_shot"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        if self.inner_steps < 0 or (self.inner_steps == 0 and self.algorithm == "fomaml"):
            raise ValueError(f"inner_steps must be >= 1 with fomaml (0 would make it plain multi-task SGD on the "
                             f"query sets), got {self.inner_steps}")
        if self.episodes is not None and self.episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {self.episodes}")
        if self.outer_lr is not None and not self.outer_lr > 0:
            raise ValueError(f"outer_lr must be > 0, got {self.outer_lr}")
        if self.algorithm == "fomaml" and self.query < 1:
            raise ValueError(f"query must be >= 1 with fomaml (its rows give the outer gradient), got {self.query}")
        return self


class ObjectiveConfig(_Section):
    """Base of every training objective's own config class (objectives/*.py: `Config`, chosen by `name`)."""

    name: str = "sft"
    """How the training loss is formed: sft (the task's own loss) or distill (docs/distillation.md)."""


class RunConfig(_Section):
    model: ModelConfig = ModelConfig()
    """The pretrained model to fine-tune."""
    task: Literal["classification", "regression", "causal_lm", "masked_lm", "embedding", "multitask"] = \
        "classification"
    """classification (single sentence or pair), regression (one real target, e.g. STS-B), causal_lm
    (instruction/chat tuning of a decoder), masked_lm, embedding, or multitask (one encoder, a head per `tasks`)."""
    tasks: dict[str, TaskEntry] | None = None
    """task: multitask: NAME -> its files, columns, kind and loss weight (each a small `data` section)."""
    mixture: MixtureConfig | None = None
    """task: multitask: how each step's task is drawn (default: proportional to the tasks' training rows)."""
    meta: MetaConfig | None = None
    """task: multitask: meta-learn across its tasks (Reptile or first-order MAML) instead of training them jointly."""
    data: DataConfig = DataConfig()
    """Where the labelled data is and how to read it."""
    strategy: StrategyConfig = StrategyConfig()
    """Which parameters train."""
    objective: SerializeAsAny[ObjectiveConfig] = Field(default_factory=ObjectiveConfig, validate_default=True)
    """How the training loss is formed (the leaf named by objective.name validates the rest of the section)."""
    train: TrainConfig = TrainConfig()
    """Optimisation and the training loop."""
    output_dir: str = "runs/{name}-{time}"
    """Run directory. `{name}` is the config file's stem, `{time}` a timestamp. Never overwritten silently."""

    @field_validator("objective", mode="before")
    @classmethod
    def _objective(cls, v):
        """Two steps (PEFT's config_cls per method): `name` picks the leaf's Config class, which validates the
        rest, so an option of another leaf is an unknown key with a did-you-mean."""
        if isinstance(v, ObjectiveConfig) and type(v) is not ObjectiveConfig:
            return v
        raw = v.model_dump() if isinstance(v, ObjectiveConfig) else v
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ValueError(f"objective: expected a mapping with a name (sft, distill), got {raw!r}")
        from . import objectives as _registered  # noqa: F401  (fills the registry)
        from .registry import training_objectives

        leaf = training_objectives.get(str(raw.get("name", "sft")))
        try:
            return leaf.Config.model_validate(raw)
        except ValidationError as err:
            raise ConfigError(_format_leaf_error(err, "objective", leaf.Config)) from None

    @model_validator(mode="after")
    def _check(self):
        if self.model.head_from is not None and self.task not in ("classification", "regression"):
            raise ValueError(f"model.head_from starts a classification or regression head, not task {self.task}; "
                             "remove it")
        if self.model.pooling == "mean" and self.task not in ("classification", "regression"):
            raise ValueError(f"model.pooling: mean feeds a classification or regression head, not task {self.task}; "
                             "remove it")
        if self.meta is not None:
            self._check_meta()
        if self.task == "multitask":
            self._check_multitask()
        elif self.tasks is not None or self.mixture is not None:
            raise ValueError(f"tasks/mixture are for task: multitask, not {self.task}; set task=multitask or remove "
                             "them")
        if self.data.train is None and self.task != "multitask":
            raise ValueError("data.train is required: set it in the config or pass data.train=PATH")
        metric = self.train.metric
        if metric is not None and self.task != "multitask":
            from .tasks import task_spec

            allowed = tuple(task_spec(self.task).metrics)
            if metric not in allowed:
                raise ValueError(f"train.metric {metric!r} does not fit task {self.task}; use one of {allowed}")
        if self.train.early_stopping_patience is not None and self.data.dev is None and not (
                self.tasks and any(e.dev for e in self.tasks.values())):
            raise ValueError("train.early_stopping_patience needs data.dev to measure improvement")
        if (self.data.prompt is None) != (self.data.completion is None):
            raise ValueError("data.prompt and data.completion go together: set both (or neither)")
        if self.data.augment is not None and self.task not in ("classification", "regression"):
            raise ValueError(f"data.augment edits labelled rows of task classification or regression, not {self.task}; "
                             "remove it")
        if self.data.k_shot is not None and self.task != "classification":
            raise ValueError(f"data.k_shot draws K rows per class, for task classification, not {self.task}; use "
                             "data.limit_train to take the first N rows")
        if self.data.k_shot_dev is not None and (self.data.k_shot is None or self.data.dev is not None):
            raise ValueError("data.k_shot_dev draws the dev set from data.train beside a data.k_shot sample: set "
                             "data.k_shot, and unset data.dev (move it to data.test to score it once at the end)")
        if self.data.unlabelled is not None and (self.objective.name not in UNLABELLED_OBJECTIVES
                                                 or self.task not in ("classification", "regression")):
            # Decoders: a prompt without a completion has no loss positions for token-level KD; learning from
            # teacher-written completions is sequence-level KD / self-training (pseudo-labels), not this stream.
            raise ValueError("data.unlabelled: a second stream of text, read by objective.name=distill (soft "
                             "targets), mmd / dann / udalm (the target domain) or gan_bert on task classification "
                             "or regression (or by `sftlab self-train`); set one of them, or remove data.unlabelled")
        if self.data.format == "text" and (self.task != "causal_lm" or self.data.prompt is not None):
            raise ValueError("data.format: text (raw text, loss on every token) is for task causal_lm without "
                             "data.prompt; encoders read raw text with task masked_lm")
        if self.task == "embedding" and self.objective.name != "simcse":
            raise ValueError("task embedding learns from raw text with objective.name=simcse; set it")
        if self.task in ("masked_lm", "embedding") and self.strategy.name in ("lora", "dora", "prompt_tuning",
                                                                              "prefix_tuning", "adapter"):
            # Its best/ is a starting point (model.name: RUN_DIR/best), which must be a whole model: an adapter
            # folder would need its base and its (untrained-by-default) MLM head to mean anything.
            raise ValueError(f"strategy.name: {self.strategy.name} saves an adapter, but task {self.task} saves a whole "
                             "model for later runs to start from; use full, bitfit, top_k_layers, ffn_only or llrd")
        if self.task == "masked_lm" and self.objective.name != "sft":
            raise ValueError(f"objective.name: {self.objective.name} needs a labelled task; task masked_lm trains "
                             "with objective sft (the default)")
        if self.data.packing and self.task != "causal_lm":
            raise ValueError("data.packing is for task: causal_lm; remove it or set task=causal_lm")
        if self.task == "regression" and self.data.labels is not None:
            raise ValueError("data.labels is for classification; remove it for task: regression")
        if self.data.packing and self.strategy.name in ("prompt_tuning", "prefix_tuning"):
            # peft drops position_ids for prompt learning, so packed examples would attend to each other
            raise ValueError(f"strategy.name {self.strategy.name} cannot train on packed rows; set data.packing=false")

        from . import strategies as _registered  # noqa: F401  (fills the registry)
        from .registry import strategies

        if self.strategy.name not in strategies:
            strategies.get(self.strategy.name)  # raises ConfigError naming the key and what is available
        return self

    def _check_meta(self) -> None:
        if self.meta.group_by is not None:
            if self.task != "classification" or self.tasks:
                raise ValueError("meta.group_by splits one classification file into tasks: set task: classification "
                                 "and data.train (no tasks: section), or remove meta.group_by")
        elif self.task != "multitask" or not self.tasks or len(self.tasks) < 2:
            raise ValueError("meta: learns across tasks: set task: multitask with two or more tasks: entries (each a "
                             "classification task, e.g. one per domain), or meta.group_by: COLUMN on one file")
        kinds = [n for n, e in (self.tasks or {}).items() if e.task != "classification"]
        if kinds:
            raise ValueError(f"meta: tasks {', '.join(kinds)} are not classification; meta-learning adapts "
                             "classifiers (remove them)")
        if self.strategy.name != "full":
            raise ValueError(f"meta: adapts every weight; strategy.name: {self.strategy.name} is not available with "
                             "it (use full, the default)")
        if self.meta.episodes is not None and self.train.max_steps is not None:
            raise ValueError("meta.episodes and train.max_steps both set the run's length; keep one")
        if self.objective.name != "sft" or self.mixture is not None:
            raise ValueError("meta: draws its own episodes from the task's own loss; remove objective and mixture")

    def _check_multitask(self) -> None:
        if not self.tasks:
            raise ValueError("task: multitask needs a tasks section: tasks: {NAME: {task: classification, train: "
                             "FILE, text: COLUMN}, ...}")
        if self.data.train is not None or self.data.dev is not None:
            raise ValueError("task: multitask reads each task's files from tasks.NAME.train / dev; remove data.train "
                             "and data.dev")
        for name in self.tasks:
            if not name or "/" in name or name in ("mean", "loss"):
                raise ValueError(f"tasks: {name!r} cannot name a task (metrics are logged as NAME/metric); rename it")
        if self.objective.name != "sft":
            raise ValueError(f"objective.name: {self.objective.name} is not available with task: multitask yet; use "
                             "sft (the default)")
        metric = self.train.metric
        if metric is not None and metric not in ("mean", "loss"):
            name, _, m = metric.partition("/")
            entry = self.tasks.get(name)
            from .tasks import task_spec

            if entry is None or m not in task_spec(entry.task).metrics:
                raise ValueError(f"train.metric {metric!r}: use mean (of each task's primary metric), loss, or "
                                 f"NAME/metric of a task ({', '.join(self.tasks)}), e.g. "
                                 f"{next(iter(self.tasks))}/{task_spec(next(iter(self.tasks.values())).task).default_metric}")

    @property
    def best_metric(self) -> str:
        from .tasks import task_spec

        return self.train.metric or task_spec(self.task).default_metric


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`a.b=1` -> {"a": {"b": 1}}; values are parsed as YAML (numbers, bools, null, lists)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=1e-4")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if value is None and raw.strip() not in ("null", "~", "Null", "NULL"):
            value = raw  # e.g. MRPC's column "#1 String": YAML would read it as a comment
        elif isinstance(value, str):
            try:  # YAML 1.1 wants a dot in floats; users write 1e-4
                value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
            except ValueError:
                pass
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is set both as a value and a section")
        node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _section_type(annotation):
    """The section class or dict type inside an annotation (`MixtureConfig | None` -> MixtureConfig)."""
    import typing

    if hasattr(annotation, "model_fields") or typing.get_origin(annotation) is dict:
        return annotation
    for arg in typing.get_args(annotation):
        if hasattr(arg, "model_fields") or typing.get_origin(arg) is dict:
            return arg
    return annotation


def _fields_at(loc: tuple) -> list[str]:
    import typing

    model: Any = RunConfig
    skip = False
    for part in loc:
        if skip:
            skip = False
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        inner = _section_type(field.annotation) if field is not None else None
        if typing.get_origin(inner) is dict:
            model, skip = typing.get_args(inner)[1], True
            continue
        if inner is None or not hasattr(inner, "model_fields"):
            break
        model = inner
    return list(model.model_fields) if hasattr(model, "model_fields") else []


def _real_key(loc: tuple) -> tuple:
    """Drop pydantic's union-member parts (`data.text.str`) so the message names a key the user wrote."""
    import typing

    model: Any = RunConfig
    skip = False
    for n, part in enumerate(loc):
        if skip:  # a dict's key (tasks.NAME): the user's own name
            skip = False
            continue
        fields = getattr(model, "model_fields", None)
        if fields is None:
            return loc[:n]
        if part not in fields:
            return loc[: n + 1]
        model = _section_type(fields[part].annotation)
        if typing.get_origin(model) is dict:
            model, skip = typing.get_args(model)[1], True
    return loc


def _format_error(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = _real_key(tuple(str(p) for p in e["loc"]))
    key = ".".join(loc) or "config"
    if e["type"] == "extra_forbidden":
        known = _fields_at(loc[:-1])
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f"did you mean {'.'.join(loc[:-1] + (close[0],))}?" if close else f"known keys: {', '.join(known)}"
        return f"{key}: unknown key; {hint}"
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "value_error":  # sections name their keys in full; a task entry's checks name the field only
        return msg if not loc or msg.startswith(loc[0]) else f"{key}.{msg}"
    return f"{key}: {msg} (got {e.get('input')!r})"


def _format_leaf_error(err: ValidationError, section: str, config_cls) -> str:
    e = err.errors()[0]
    loc = tuple(str(p) for p in e["loc"])
    key = ".".join((section,) + loc)
    if e["type"] == "extra_forbidden":
        known = list(config_cls.model_fields)
        close = difflib.get_close_matches(loc[-1], known, n=1)
        name = config_cls.model_fields["name"].default
        hint = f"did you mean {section}.{close[0]}?" if close else f"{section} {name} knows: {', '.join(known)}"
        return f"{key}: unknown key for {section} {name}; {hint}"
    if e["type"] == "missing":
        return f"{key}: required for {section} {config_cls.model_fields['name'].default}; set it"
    msg = e["msg"].removeprefix("Value error, ")
    return msg if e["type"] == "value_error" else f"{key}: {msg} (got {e.get('input')!r})"


def build_config(raw: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


class _DuplicateKey(Exception):
    pass


class _UniqueKeys(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML keeps the last silently: two tasks named alike
    would train one)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(f"line {key_node.start_mark.line + 1}: key {key!r} appears twice in one mapping; "
                                    "give each key (each task) once")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path, what: str) -> dict:
    """A YAML mapping from a file, or a one-line ConfigError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: {what} file not found")
    try:
        raw = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeys) or {}
    except _DuplicateKey as e:
        raise ConfigError(f"{path}: {e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(raw).__name__}")
    return raw


def drop_foreign_options(raw: dict) -> dict:
    """`raw` without the strategy options its strategy does not read: for recipes that swap strategy.name over one
    base config (`sftlab compare`, a search over strategies), where the base's lora `r` is not a mistake under full."""
    section = raw.get("strategy")
    if not isinstance(section, dict):
        return raw
    name = section.get("name", StrategyConfig.model_fields["name"].default)
    kept = {k: v for k, v in section.items() if name in STRATEGY_OPTIONS.get(k, (name,))}
    return raw | {"strategy": kept}


def load_config(path: str | Path | None, overrides: list[str] | None = None, *,
                foreign_options: bool = False) -> RunConfig:
    """Read YAML (or nothing), apply overrides, validate. Relative data paths resolve against data.dir.
    foreign_options: drop strategy options the chosen strategy does not read, instead of refusing them."""
    raw: dict[str, Any] = {}
    name = "run"
    if path is not None:
        raw = read_yaml(path, "config")
        name = Path(path).stem
    raw.pop("search", None)  # `sftlab tune`'s search space: the rest of the file trains as it is
    raw = _merge(raw, parse_overrides(overrides or []))
    cfg = build_config(drop_foreign_options(raw) if foreign_options else raw)
    if "{" in cfg.output_dir:
        try:
            cfg.output_dir = cfg.output_dir.format(name=name, time=time.strftime("%Y%m%d-%H%M%S"))
        except (KeyError, ValueError, IndexError):
            raise ConfigError(
                f"output_dir: bad placeholder in {cfg.output_dir!r}; only {{name}} and {{time}} are known"
            ) from None
    return cfg


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
