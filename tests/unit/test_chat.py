"""Chat data: every row layout maps to the same messages, bad rows fail with file:line, and the loss mask covers
exactly the assistant turns (content + end-of-turn marker) whatever the template and BPE do at the boundaries."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA, train_bpe_tokenizer
from sftlab.config import DataConfig
from sftlab.data.chat import (CHATML, Conversation, encode_conversations, render_and_mask, render_prompt,
                              rows_to_conversations)
from sftlab.data.read import read_table
from sftlab.errors import ConfigError, DataError

SEED_TASKS = SHARED_DATA / "instructions" / "alpaca_seed_tasks.jsonl"
WORDS = ("hello there good morning translate to french how are you today the weather is nice sure here is an "
         "answer please tell me about cats and dogs they sleep a lot bonjour thanks").split()


def _train_tokenizer(trim_offsets: bool):
    return train_bpe_tokenizer(trim_offsets, words=WORDS, vocab_size=500)


@pytest.fixture(scope="module", params=[True, False], ids=["trim_offsets", "raw_offsets"])
def tok(request):
    t = _train_tokenizer(request.param)
    assert not t.chat_template  # so the ChatML fallback is what renders
    return t


def runs(tok, ids, mask) -> list[str]:
    """Decoded text of each maximal run of masked-in tokens."""
    out, cur = [], []
    for i, m in zip(ids + [None], mask + [0]):
        if m:
            cur.append(i)
        elif cur:
            out.append(tok.decode(cur))
            cur = []
    return out


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def convs_of(path: Path, **data) -> tuple[list[Conversation], object]:
    cfg = DataConfig(**data)
    return rows_to_conversations(read_table(str(path), header=True, skip_invalid=cfg.skip_invalid), cfg)


CHAT3 = [
    {"role": "system", "content": "Be brief and kind."},
    {"role": "user", "content": "Hello there, how are you today?"},
    {"role": "assistant", "content": "Good morning.\n\nThe weather is  nice, thanks!  "},
    {"role": "user", "content": "Tell me about cats."},
    {"role": "assistant", "content": "They sleep a lot."},
    {"role": "user", "content": "And dogs?"},
    {"role": "assistant", "content": "Dogs are good."},
]
NON_ASSISTANT = [m["content"] for m in CHAT3 if m["role"] != "assistant"]
ASSISTANT = [m["content"] for m in CHAT3 if m["role"] == "assistant"]


# ------------------------------------------------------------------------------------------------ rows


USER = "Translate to French.\n\nGood morning"
REPLY = "Bonjour"
SAME = {
    "alpaca": {"instruction": "Translate to French.", "input": "Good morning", "output": REPLY},
    "prompt_completion": {"prompt": USER, "completion": REPLY},
    "messages": {"messages": [{"role": "user", "content": USER}, {"role": "assistant", "content": REPLY}]},
    "sharegpt": {"conversations": [{"from": "human", "value": USER}, {"from": "gpt", "value": REPLY}]},
}


@pytest.mark.parametrize("fmt", ["auto", *SAME])
def test_every_format_maps_to_the_same_messages(tmp_path, fmt):
    rows = list(SAME.values()) if fmt == "auto" else [SAME[fmt]]
    convs, skipped = convs_of(write(tmp_path / "d.jsonl", rows), format=fmt)
    want = [{"role": "user", "content": USER}, {"role": "assistant", "content": REPLY}]
    assert [c.messages for c in convs] == [want] * len(rows)
    assert [c.line for c in convs] == list(range(1, len(rows) + 1)) and not skipped


def test_csv_with_header_and_conversational_prompt_completion(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text('instruction,input,output\nTranslate to French.,Good morning,Bonjour\n"Say hi.",,hi\n')
    convs, _ = convs_of(csv)
    assert convs[0].messages[0]["content"] == USER and convs[1].messages[0]["content"] == "Say hi."
    row = {"prompt": [{"role": "user", "content": USER}], "completion": [{"role": "assistant", "content": REPLY}]}
    convs, _ = convs_of(write(tmp_path / "pc.jsonl", [row]))
    assert convs[0].messages == [{"role": "user", "content": USER}, {"role": "assistant", "content": REPLY}]


def test_system_prompt_only_where_there_is_none(tmp_path):
    own = {"messages": [{"role": "system", "content": "Mine."}, *SAME["messages"]["messages"]]}
    convs, _ = convs_of(write(tmp_path / "d.jsonl", [SAME["alpaca"], own]), system_prompt="Be nice.")
    assert convs[0].messages[0] == {"role": "system", "content": "Be nice."} and len(convs[0].messages) == 3
    assert convs[1].messages[0] == {"role": "system", "content": "Mine."} and len(convs[1].messages) == 3


def test_seed_task_instances_become_one_conversation_each(tmp_path):
    row = {"id": "t", "instruction": "Antonym?", "is_classification": False,
           "instances": [{"input": "hot", "output": "cold"}, {"input": "", "output": "Give me a word."}]}
    convs, _ = convs_of(write(tmp_path / "d.jsonl", [SAME["prompt_completion"], row]))
    assert [c.line for c in convs] == [1, 2, 2]
    assert convs[1].messages == [{"role": "user", "content": "Antonym?\n\nhot"},
                                 {"role": "assistant", "content": "cold"}]
    assert convs[2].messages == [{"role": "user", "content": "Antonym?"},
                                 {"role": "assistant", "content": "Give me a word."}]


@pytest.mark.skipif(not SEED_TASKS.is_file(), reason="shared alpaca seed tasks not available")
def test_real_alpaca_seed_tasks():
    rows = [json.loads(x) for x in SEED_TASKS.read_text(encoding="utf-8").splitlines() if x.strip()]
    convs, skipped = convs_of(SEED_TASKS)
    assert len(convs) == sum(len(r["instances"]) for r in rows) and not skipped
    for c in convs:
        row, inst = rows[c.line - 1], rows[c.line - 1]["instances"][0]
        user = row["instruction"] + (f"\n\n{inst['input']}" if inst["input"].strip() else "")
        assert c.messages == [{"role": "user", "content": user}, {"role": "assistant", "content": inst["output"]}]


def M(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


BAD = {  # name: (row, data config, text the error must contain)
    "unknown_role": (M(("user", "hi"), ("bot", "yo")), {}, "unknown role 'bot' (messages[1])"),
    "unknown_sharegpt_from": ({"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]},
                              {}, "unknown role 'robot' (conversations[1]); use human, user, gpt"),
    "missing_content": ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, {},
                        "missing content (messages[0], role user)"),
    "missing_role": ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}, {},
                     "missing role (messages[0]"),
    "empty_content": (M(("user", "  "), ("assistant", "x")), {}, "empty content (messages[0], role user)"),
    "empty_assistant": ({"instruction": "Say hi.", "output": ""}, {}, "empty assistant turn (output)"),
    "empty_assistant_msg": (M(("user", "hi"), ("assistant", "\n")), {}, "empty assistant turn (messages[1])"),
    "not_ending_with_assistant": (M(("user", "hi"), ("assistant", "yo"), ("user", "and?")), {},
                                  "conversation does not end with an assistant turn (last turn is user, messages[2])"),
    "no_assistant": (M(("system", "s"), ("user", "hi")), {}, "no assistant turn"),
    "assistant_first": (M(("assistant", "hi"), ("user", "x"), ("assistant", "y")), {},
                        "assistant turn before any user turn (messages[0])"),
    "not_detected": ({"question": "q", "answer": "a"}, {}, "format not detected (keys: ['answer', 'question'])"),
    "wrong_type_messages": ({"messages": "hi"}, {}, "wrong type (messages is a str)"),
    "wrong_type_content": (M(("user", "hi"), ("assistant", ["a", "b"])), {},
                           "wrong type (messages[1] content is a list)"),
    "wrong_type_turn": ({"messages": ["hi"]}, {}, "wrong type (messages[0] is a str)"),
    "wrong_type_instances": ({"instruction": "x", "instances": {"input": "", "output": "y"}}, {},
                             "wrong type (instances is a dict)"),
    "explicit_format_mismatch": (SAME["prompt_completion"], {"format": "alpaca"}, "missing field (instruction)"),
    "seed_instance": ({"instruction": "x", "instances": [{"input": "a", "output": "b"}, {"input": "c", "output": ""}]},
                      {}, "empty assistant turn (instances[1].output)"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_row_names_file_line_and_reason_or_is_skipped(tmp_path, name):
    row, data, reason = BAD[name]
    # good, blank line, good, bad (line 4), good: line numbers are file lines
    good = [SAME[data["format"]]] * 3 if "format" in data else [SAME["messages"], SAME["alpaca"], SAME["sharegpt"]]
    path = write(tmp_path / "d.jsonl", [good[0], "", good[1], row, good[2]])
    with pytest.raises(DataError) as err:
        convs_of(path, **data)
    msg = str(err.value)
    assert msg.startswith(f"{path}:4: ") and reason in msg and "data.skip_invalid=true" in msg, msg
    convs, skipped = convs_of(path, skip_invalid=True, **data)
    assert [c.line for c in convs] == ([1, 3, 4, 5] if name == "seed_instance" else [1, 3, 5])  # seed: 1 good instance
    assert skipped == {reason.split(" (")[0]: 1}


def test_all_rows_bad_is_an_error_even_when_skipping(tmp_path):
    with pytest.raises(DataError, match=r"no valid rows left .*no assistant turn"):
        convs_of(write(tmp_path / "d.jsonl", [M(("user", "hi"))]), skip_invalid=True)


# ------------------------------------------------------------------------------------------------ mask


def test_mask_covers_exactly_the_assistant_turns_chatml_fallback(tok):
    ids, mask = render_and_mask(tok, CHAT3, template=None, train_on="assistant")
    text = tok.apply_chat_template(CHAT3, chat_template=CHATML, tokenize=False)
    assert ids == tok(text, add_special_tokens=False)["input_ids"] and tok.decode(ids) == text
    assert runs(tok, ids, mask) == [c + "<|im_end|>" for c in ASSISTANT]
    masked = tok.decode([i for i, m in zip(ids, mask) if m])
    assert not any(t in masked for t in NON_ASSISTANT + ["<|im_start|>", "assistant\n", "user"])
    # what is left out is the prompt side: system, user turns and every role header
    unmasked = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert all(t in unmasked for t in NON_ASSISTANT) and unmasked.count("<|im_start|>assistant\n") == 3


def test_last_turn_and_all(tok):
    ids, mask = render_and_mask(tok, CHAT3, template=None, train_on="last_turn")
    assert runs(tok, ids, mask) == [ASSISTANT[-1] + "<|im_end|>"]
    ids2, mask2 = render_and_mask(tok, CHAT3, template=None, train_on="all")
    assert ids2 == ids and mask2 == [1] * len(ids)
    with pytest.raises(ConfigError, match="data.train_on"):
        render_and_mask(tok, CHAT3, template=None, train_on="everything")


ALPACA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
    "{% else %}### Response:\n{{ m['content'] }}{{ eos_token }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)


def test_custom_template_file(tok, tmp_path):
    path = tmp_path / "alpaca.jinja"
    path.write_text(ALPACA_TEMPLATE)
    ids, mask = render_and_mask(tok, CHAT3, template=str(path), train_on="assistant")
    assert tok.decode(ids).startswith("Be brief and kind.\n\n### Instruction:\nHello there")
    assert runs(tok, ids, mask) == [c + "<|im_end|>" for c in ASSISTANT]
    assert render_prompt(tok, CHAT3[:2], str(path)).endswith("### Instruction:\nHello there, how are you today?"
                                                             "\n\n### Response:\n")
    with pytest.raises(ConfigError, match="data.template: .*nope.jinja not found"):
        render_and_mask(tok, CHAT3, template=str(tmp_path / "nope.jinja"), train_on="assistant")


# Content straight after "assistant: " and trimmed by the template: the header's space and the content's first
# word are ONE byte-level token (" good"), so tokenizing header and content apart gives other ids.
TIGHT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}"
)


def test_boundary_token_shared_by_header_and_content(tok):
    chat = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "  good morning  "},
            {"role": "user", "content": "and dogs?"}, {"role": "assistant", "content": "dogs sleep a lot."}]
    ids, mask = render_and_mask(tok, chat, template=TIGHT_TEMPLATE, train_on="assistant")
    text = tok.decode(ids)
    head = tok(render_prompt(tok, chat[:1], TIGHT_TEMPLATE), add_special_tokens=False)["input_ids"]
    # the precondition: alone, the prompt ends in a lone " "; in the whole text that space is part of " good"
    assert tok.decode(head[-1:]) == " " and tok.decode(ids[len(head) - 1: len(head)]) == " good"
    assert ids[: len(head) - 1] == head[:-1] and ids == tok(text, add_special_tokens=False)["input_ids"]
    # the straddling token is trained on (the model must emit it); nothing else of the header is
    assert runs(tok, ids, mask) == [" good morning<|im_end|>", " dogs sleep a lot.<|im_end|>"]


SMOL_LIKE = (  # a default system prompt is injected when the conversation has none (as SmolLM2's template does)
    "{% for m in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_template_with_default_system_prompt(tok):
    chat = CHAT3[1:]
    ids, mask = render_and_mask(tok, chat, template=SMOL_LIKE, train_on="assistant")
    assert tok.decode(ids).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert runs(tok, ids, mask) == [c + "<|im_end|>" for c in ASSISTANT]


def test_template_that_renders_turns_differently_is_refused(tok):
    last_differs = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if loop.last %} [end]{% endif %}\n"
                    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ValueError, match="inline data.template: the first 2 message"):
        render_and_mask(tok, CHAT3, template=last_differs, train_on="assistant")
    ids, mask = render_and_mask(tok, CHAT3, template=last_differs, train_on="all")  # no spans needed
    assert all(mask)


def test_render_prompt(tok):
    full = tok.apply_chat_template(CHAT3, chat_template=CHATML, tokenize=False)
    prompt = render_prompt(tok, CHAT3, None)  # the final assistant turn is the reference: left out
    assert prompt == render_prompt(tok, CHAT3[:-1]) and prompt.endswith("And dogs?<|im_end|>\n<|im_start|>assistant\n")
    assert full.startswith(prompt) and full[len(prompt):] == "Dogs are good.<|im_end|>\n"


# ---------------------------------------------------------------------------------------------- encode


def conv(messages, line=7):
    return Conversation(messages, line, "chats.jsonl")


def test_overlength_policies(tok):
    short = conv([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], line=1)
    long_reply = conv(CHAT3[1:3], line=2)  # loss tokens reach the end
    long_prompt = conv([{"role": "user", "content": " ".join(WORDS * 2)}, {"role": "assistant", "content": "sure"}],
                       line=3)
    everything = [short, long_reply, long_prompt]
    full_ids, full_masks, counts = encode_conversations(tok, everything, DataConfig(max_length=4096))
    assert not counts and all(any(m) for m in full_masks)
    n_short, n_reply, n_prompt = map(len, full_ids)
    limit = n_reply - 3
    assert n_short <= limit < n_reply and n_prompt > limit and sum(full_masks[2][:limit]) == 0

    ids, masks, counts = encode_conversations(tok, [short, long_reply, long_prompt],
                                              DataConfig(max_length=limit, overlength="truncate"))
    assert ids == [full_ids[0], full_ids[1][:limit]] and masks == [full_masks[0], full_masks[1][:limit]]
    assert counts == {"truncated": 1, "dropped": 1, "dropped: no loss tokens within max_length": 1}

    ids, masks, counts = encode_conversations(tok, [short, long_reply, long_prompt],
                                              DataConfig(max_length=limit, overlength="drop"))
    assert ids == [full_ids[0]] and counts == {"dropped": 2, "dropped: longer than max_length": 2}

    with pytest.raises(DataError) as err:
        encode_conversations(tok, [short, long_reply], DataConfig(max_length=limit, overlength="error"))
    assert str(err.value) == (f"chats.jsonl:2: {n_reply} tokens > data.max_length={limit}; raise max_length, "
                              f"or set data.overlength=truncate|drop")


def test_template_failure_is_a_row_error_or_skipped(tok):
    strict = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
              "{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    good = conv(CHAT3[1:3], line=1)
    with pytest.raises(DataError, match=r"^chats.jsonl:7: chat template failed \(inline data.template: no system"):
        encode_conversations(tok, [good, conv(CHAT3)], DataConfig(template=strict))
    ids, _, counts = encode_conversations(tok, [good, conv(CHAT3)], DataConfig(template=strict, skip_invalid=True))
    assert len(ids) == 1 and counts == {"dropped": 1, "dropped: chat template failed": 1}


def test_train_on_from_config(tok):
    ids, masks, _ = encode_conversations(tok, [conv(CHAT3)], DataConfig(train_on="last_turn"))
    assert runs(tok, ids[0], masks[0]) == [ASSISTANT[-1] + "<|im_end|>"]


# ----------------------------------------------------------------------------------------- integration


@pytest.mark.integration
def test_mask_on_smollm2_chat_template():
    try:
        from sftlab.models.packaged import decoder_path
    except ImportError:
        pytest.skip("sftlab.models.packaged.decoder_path not available")
    from transformers import AutoTokenizer

    try:
        path = decoder_path("smollm2-135m-instruct")
    except ConfigError as e:
        pytest.skip(str(e))
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template
    for chat in (CHAT3, CHAT3[1:]):  # with a system turn, and with SmolLM2's injected default system prompt
        ids, mask = render_and_mask(tok, chat, template=None, train_on="assistant")
        text = tok.apply_chat_template(chat, tokenize=False)
        assert ids == tok(text, add_special_tokens=False)["input_ids"]
        assert runs(tok, ids, mask) == [c + "<|im_end|>" for c in ASSISTANT]
        assert "SmolLM" in tok.decode(ids) or chat[0]["role"] == "system"
    prompt = render_prompt(tok, CHAT3[1:2])
    assert prompt.endswith("<|im_start|>assistant\n") and "SmolLM" in prompt
