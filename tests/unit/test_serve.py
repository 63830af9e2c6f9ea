"""`sftlab serve` in-process: answers equal offline predictions, micro-batching keeps each request's order, limits
answer 413/422/429/504 with JSON, auth, generation and OpenAI chat completions (incl. SSE), and a table of hostile
requests that all get a 4xx with a message, never a 5xx."""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from starlette.testclient import TestClient

from sftlab.serve import ServeSettings, create_app
from sftlab.serve.backend import Classifier, Generator
from tests.unit.test_generation import make_model, make_tokenizer

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LABELS = ["negative", "positive"]
TEXTS = ["the film was great", "awful", "a lovely, lovely meal with friends and family on a sunny day",
         "bad", "the hotel was fine but the phone was boring and the song was ugly and dreadful and poor", "ok"]


def export_folder(src: Path, out: Path, *, task="classification", labels=LABELS, max_length=16, seed=0) -> Path:
    """An hf-format `sftlab export` folder built from the tiny BERT (random head, seeded)."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(seed)
    n = 1 if task == "regression" else len(labels)
    model = BertForSequenceClassification.from_pretrained(src, num_labels=n)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    (out / "sftlab_export.json").write_text(json.dumps({
        "format": "hf", "task": task, "labels": labels if task == "classification" else None,
        "max_length": max_length, "text_pair": False, "template": None, "system_prompt": None}))
    return out


@pytest.fixture(scope="module")
def cls_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return export_folder(tiny_model_dir, tmp_path_factory.mktemp("cls-export"))


def offline(folder: Path, text: str, pair: str | None = None, max_length: int = 16) -> torch.Tensor:
    """One text at a time through plain transformers: what the server must reproduce."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(**tok(text, pair, truncation=True, max_length=max_length, return_tensors="pt")).logits[0]


def settings(**kw) -> ServeSettings:
    base = dict(token=TOKEN, max_texts=8, max_chars=100, max_body_bytes=256 * 1024, max_new_tokens=64, timeout_s=20,
                precision="fp32")
    return ServeSettings(**(base | kw))


@pytest.fixture(scope="module")
def cls_client(cls_dir):
    with TestClient(create_app(cls_dir, settings(max_wait_ms=20, max_batch_size=16))) as c:
        yield c


def gen_backend(delay: float = 0.0) -> Generator:
    """The character-level tiny Llama of test_generation (never emits EOS: outputs run to max_new_tokens)."""
    tok = make_tokenizer()
    gen = Generator(make_model(len(tok)), tok, {"task": "causal_lm", "template": None, "system_prompt": None},
                    name="tiny-llama")
    if delay:  # every new token waits `delay`: a generation slow enough to time out or to be interrupted
        real = gen.generate
        gen.results = []

        def slow(ids, **kw):
            kw["on_text"] = (lambda f: (lambda t: (time.sleep(delay), f and f(t))))(kw.get("on_text"))
            out = real(ids, **kw)
            gen.results.append(out)
            return out
        gen.generate = slow
    return gen


@pytest.fixture(scope="module")
def gen_client():
    with TestClient(create_app(gen_backend(), settings())) as c:
        yield c


def post(c, path, body, **kw):
    return c.post(path, json=body, headers=AUTH, **kw)


# ------------------------------------------------------------------------------------------- classification


def test_classify_equals_offline_predictions(cls_client, cls_dir):
    r = post(cls_client, "/v1/classify", {"texts": TEXTS, "all_scores": True})
    assert r.status_code == 200
    preds = r.json()["predictions"]
    assert len(preds) == len(TEXTS)
    for text, p in zip(TEXTS, preds):
        probs = torch.softmax(offline(cls_dir, text), -1)
        assert p["label"] == LABELS[int(probs.argmax())]
        assert p["score"] == pytest.approx(float(probs.max()), abs=1e-5)
        assert [p["scores"][n] for n in LABELS] == pytest.approx(probs.tolist(), abs=1e-5)


def test_pairs_equal_offline(cls_client, cls_dir):
    pairs = [["the film was great", "it was awful"], ["ok", "a lovely meal"]]
    preds = post(cls_client, "/v1/classify", {"texts": pairs}).json()["predictions"]
    for (a, b), p in zip(pairs, preds):
        probs = torch.softmax(offline(cls_dir, a, b), -1)
        assert p["label"] == LABELS[int(probs.argmax())] and p["score"] == pytest.approx(float(probs.max()), abs=1e-5)
        assert "scores" not in p


def test_bf16_keeps_labels(cls_dir):
    """precision=bf16 (auto picks it where bf16 matmuls measure faster): same labels here, probabilities within 2e-2."""
    with TestClient(create_app(cls_dir, ServeSettings(precision="bf16"))) as c:
        preds = c.post("/v1/classify", json={"texts": TEXTS}).json()["predictions"]
    for text, p in zip(TEXTS, preds):
        probs = torch.softmax(offline(cls_dir, text), -1)
        assert p["score"] == pytest.approx(float(probs.max()), abs=2e-2)
        if abs(float(probs[0] - probs[1])) > 0.04:
            assert p["label"] == LABELS[int(probs.argmax())]


def test_run_directory_equals_sftlab_predict(cls_dir, tmp_path):
    """A run directory (best/ + sftlab.json) is served through load_trained; answers == `sftlab predict`."""
    import shutil

    from sftlab.eval.evaluate import predict_file

    best = tmp_path / "run" / "best"
    shutil.copytree(cls_dir, best)
    (best / "sftlab.json").write_text(json.dumps({"task": "classification", "labels": LABELS, "max_length": 16,
                                                  "adapter": None, "text_pair": False}))
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    expected = list(predict_file(str(tmp_path / "run"), str(data), bf16=False))
    with TestClient(create_app(tmp_path / "run", ServeSettings(precision="fp32"))) as c:
        preds = c.post("/v1/classify", json={"texts": TEXTS}).json()["predictions"]
    assert [p["label"] for p in preds] == [e["label"] for e in expected]
    assert [p["score"] for p in preds] == pytest.approx([e["score"] for e in expected], abs=1e-5)


def test_regression(tiny_model_dir, tmp_path):
    folder = export_folder(tiny_model_dir, tmp_path / "reg", task="regression", labels=None)
    with TestClient(create_app(folder, ServeSettings(precision="fp32"))) as c:
        preds = c.post("/v1/classify", json={"texts": TEXTS[:3]}).json()["predictions"]
    for text, p in zip(TEXTS, preds):
        assert p["label"] is None and p["score"] == pytest.approx(float(offline(folder, text)[0]), abs=1e-5)


def test_concurrent_requests_are_batched_and_keep_their_order(cls_client):
    """50 concurrent requests of 1-5 texts: each answer equals the request's solo answer, in its order, and the
    server merged requests (some forward pass held more than one request's texts)."""
    pool = [t for t in TEXTS] + [f"the {w} was {v}" for w in ("meal", "show", "game") for v in ("good", "ugly")]
    reqs = [[pool[(i * 7 + j) % len(pool)] for j in range(1 + i % 5)] for i in range(50)]
    solo = {t: post(cls_client, "/v1/classify", {"texts": [t]}).json()["predictions"][0] for t in pool}
    before = _batch_histogram(cls_client)
    with ThreadPoolExecutor(50) as ex:
        answers = list(ex.map(lambda texts: post(cls_client, "/v1/classify", {"texts": texts}), reqs))
    for texts, r in zip(reqs, answers):
        assert r.status_code == 200
        got = r.json()["predictions"]
        assert [p["label"] for p in got] == [solo[t]["label"] for t in texts]
        assert [p["score"] for p in got] == pytest.approx([solo[t]["score"] for t in texts], abs=1e-5)
    after = _batch_histogram(cls_client)
    batches, singles = after["count"] - before["count"], after["1.0"] - before["1.0"]
    texts_run = after["sum"] - before["sum"]
    assert texts_run == sum(map(len, reqs))
    assert batches < len(reqs) and batches - singles > 0  # fewer passes than requests; some held > 1 text


def _batch_histogram(c) -> dict:
    out = {}
    for line in c.get("/metrics", headers=AUTH).text.splitlines():
        if line.startswith("sftlab_batch_size_bucket"):
            out[line.split('le="')[1].split('"')[0]] = float(line.split()[-1])
        elif line.startswith("sftlab_batch_size_count"):
            out["count"] = float(line.split()[-1])
        elif line.startswith("sftlab_batch_size_sum"):
            out["sum"] = float(line.split()[-1])
    return out


def test_metrics_exposition(cls_client):
    text = cls_client.get("/metrics", headers=AUTH).text
    for name in ("sftlab_requests_total", "sftlab_request_duration_seconds_bucket", "sftlab_batch_size_bucket",
                 'sftlab_queue_depth{kind="classify"}', "sftlab_inference_seconds_bucket"):
        assert name in text
    assert cls_client.get("/metrics").status_code == 401


# ------------------------------------------------------------------------------------ overload and time limit


class SlowClassifier(Classifier):
    """Sleeps `delay` per forward pass and records what it was asked."""

    def __init__(self, delay: float):
        super().__init__(lambda texts, pairs: torch.zeros(len(texts), 2).numpy(),
                         {"task": "classification", "labels": LABELS})
        self.delay, self.calls = delay, []

    def predict(self, items):
        self.calls.append([t for t, _ in items])
        time.sleep(self.delay)
        return super().predict(items)


def test_full_queue_answers_429():
    backend = SlowClassifier(0.4)
    with TestClient(create_app(backend, ServeSettings(max_batch_size=1, max_wait_ms=0, max_queue=3,
                                                      max_texts=3))) as c:
        with ThreadPoolExecutor(10) as ex:
            rs = list(ex.map(lambda i: c.post("/v1/classify", json={"texts": [f"t{i}"]}), range(10)))
    codes = sorted(r.status_code for r in rs)
    assert set(codes) == {200, 429} and codes.count(200) >= 3 and codes.count(429) >= 4
    busy = next(r for r in rs if r.status_code == 429)
    assert busy.json()["error"]["type"] == "queue_full" and busy.headers["retry-after"] == "1"


def test_timeout_answers_504_and_drops_queued_work():
    backend = SlowClassifier(0.8)
    with TestClient(create_app(backend, ServeSettings(max_batch_size=1, max_wait_ms=0, timeout_s=0.4))) as c:
        with ThreadPoolExecutor(2) as ex:
            first = ex.submit(c.post, "/v1/classify", json={"texts": ["running"]})
            time.sleep(0.05)
            second = ex.submit(c.post, "/v1/classify", json={"texts": ["queued"]})
            t0 = time.perf_counter()
            rs = [first.result(), second.result()]
            waited = time.perf_counter() - t0
        time.sleep(0.6)  # the running batch finishes; the queued request must not reach the model
        assert c.get("/metrics").status_code == 200
    assert [r.status_code for r in rs] == [504, 504] and waited < 0.75
    assert rs[0].json()["error"]["type"] == "timeout"
    assert ["queued"] not in backend.calls and ["running"] in backend.calls


# ------------------------------------------------------------------------------------------------------ auth


@pytest.mark.parametrize("headers,status", [
    ({}, 401), ({"Authorization": "Bearer wrong"}, 401), ({"Authorization": f"Basic {TOKEN}"}, 401),
    ({"Authorization": f"bearer {TOKEN}"}, 200), ({"Authorization": ("Bearer " + "é" * 8).encode()}, 401), (AUTH, 200)])
def test_bearer_token(cls_client, headers, status):
    r = cls_client.post("/v1/classify", json={"texts": ["ok"]}, headers=headers)
    assert r.status_code == status
    if status == 401:
        assert r.headers["www-authenticate"].startswith("Bearer") and r.json()["error"]["type"] == "unauthorized"


def test_health_is_open(cls_client):
    assert cls_client.get("/health").json() == {"status": "ok", "task": "classification"}


# ------------------------------------------------------------------------------------------------ generation


def test_generate_equals_offline_greedy(gen_client):
    from sftlab.eval.generate import generate

    backend = gen_client.app.state.backend
    r = post(gen_client, "/v1/generate", {"prompt": "the film was", "max_new_tokens": 12, "raw": True})
    assert r.status_code == 200
    body = r.json()
    expected = generate(backend.model, backend.tokenizer, ["the film was"], max_new_tokens=12)[0]
    assert body["text"] == expected and body["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 12, "completion_tokens": 12, "total_tokens": 24}
    stop = expected[5:7]
    r = post(gen_client, "/v1/generate", {"prompt": "the film was", "max_new_tokens": 12, "raw": True, "stop": stop})
    assert r.json()["text"] == expected[:expected.find(stop)] and r.json()["finish_reason"] == "stop"


def test_chat_completion_openai_shape(gen_client):
    from sftlab.data.chat import render_prompt
    from sftlab.eval.generate import generate

    backend = gen_client.app.state.backend
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    r = post(gen_client, "/v1/chat/completions", {"model": "x", "messages": msgs, "max_tokens": 10, "temperature": 0})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    prompt = render_prompt(backend.tokenizer, msgs)
    assert choice["message"]["content"] == generate(backend.model, backend.tokenizer, [prompt], max_new_tokens=10)[0]
    assert body["usage"]["completion_tokens"] == 10


def sse_events(text: str) -> list:
    events = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_chat_completion_stream_equals_non_stream(gen_client):
    body = {"messages": [{"role": "user", "content": "tell me"}], "max_tokens": 16, "temperature": 0,
            "stop": ["q"], "stream": True, "stream_options": {"include_usage": True}}
    r = post(gen_client, "/v1/chat/completions", body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    whole = post(gen_client, "/v1/chat/completions", body | {"stream": False}).json()
    assert text == whole["choices"][0]["message"]["content"]
    assert events[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert events[-1]["usage"] == whole["usage"] and events[-1]["choices"] == []
    assert all(e["object"] == "chat.completion.chunk" for e in events)


def test_stream_stops_generation_when_client_leaves():
    backend = gen_backend(delay=0.25)
    with TestClient(create_app(backend, ServeSettings(max_new_tokens=500))) as c:
        # 200 tokens x 250 ms: a 50 s window, so a busy machine (the full suite on 2 cores took >2 s, and CI once
        # >5 s, to notice the disconnect) still sees the cancel land before the length limit; the test itself
        # lasts only until the cancel lands.
        body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 200, "stream": True}
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        deadline = time.monotonic() + 60
        while c.app.state.runtime["genq"].depth != 0 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert backend.results[-1].finish_reason == "cancelled" and backend.results[-1].completion_tokens < 160


def test_generation_timeout_answers_504_and_stops():
    backend = gen_backend(delay=0.01)
    with TestClient(create_app(backend, ServeSettings(timeout_s=0.3, max_new_tokens=500))) as c:
        t0 = time.perf_counter()
        r = c.post("/v1/generate", json={"prompt": "go", "max_new_tokens": 200, "raw": True})
        took = time.perf_counter() - t0
        r2 = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "go"}],
                                                  "max_tokens": 200, "stream": True})
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout" and took < 1.5
    # [0] is the warm-up; the thread stops itself at the deadline, or the handler's cancel got there first
    assert backend.results[1].finish_reason in ("timeout", "cancelled") and backend.results[1].completion_tokens < 100
    events = sse_events(r2.text)  # a stream has already said 200: the timeout is an error event, then [DONE]
    assert events[-1]["error"]["type"] == "timeout"


def test_generation_queue_full_answers_429():
    backend = gen_backend(delay=0.01)
    with TestClient(create_app(backend, ServeSettings(max_queue_generate=2, max_new_tokens=500))) as c:
        with ThreadPoolExecutor(6) as ex:
            rs = list(ex.map(lambda _: c.post("/v1/generate", json={"prompt": "a", "max_new_tokens": 30, "raw": True}),
                             range(6)))
    codes = sorted(r.status_code for r in rs)
    assert set(codes) == {200, 429} and codes.count(200) >= 2


def test_served_causal_lm_export_folder(tiny_llama_dir, tmp_path):
    import shutil

    folder = tmp_path / "llm"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / "sftlab_export.json").write_text(json.dumps({"format": "merged", "task": "causal_lm", "labels": None,
                                                           "max_length": 160, "template": None,
                                                           "system_prompt": "You are kind."}))
    with TestClient(create_app(folder, ServeSettings())) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hello there"}],
                                                 "max_tokens": 5, "temperature": 0.7, "seed": 1})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 5
        backend = c.app.state.backend
        assert backend.render([{"role": "user", "content": "hi"}]).startswith("<|im_start|>system\nYou are kind.")
        assert c.post("/v1/classify", json={"texts": ["a"]}).status_code == 400


# --------------------------------------------------------------------------------------- hostile requests

LONG = "x" * 101
NESTED = "[" * 100_000 + "]" * 100_000
CHAT = "/v1/chat/completions"
HOSTILE = [
    # (id, app, method, path, body: dict (JSON) | bytes | None, extra headers, expected status)
    ("bad JSON", "cls", "POST", "/v1/classify", b'{"texts": ["a", ', {}, 400),
    ("empty body", "cls", "POST", "/v1/classify", b"", {}, 400),
    ("non-UTF-8 body", "cls", "POST", "/v1/classify", b'{"texts": ["\xff\xfe"]}', {}, 400),
    ("JSON nested 100k deep", "cls", "POST", "/v1/classify", NESTED.encode(), {}, 400),
    ("form body, not JSON", "cls", "POST", "/v1/classify", b"texts=a", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
    ("body is a JSON list", "cls", "POST", "/v1/classify", ["a", "b"], {}, 422),
    ("texts is a string", "cls", "POST", "/v1/classify", {"texts": "hello"}, {}, 422),
    ("texts holds numbers", "cls", "POST", "/v1/classify", {"texts": [1, 2]}, {}, 422),
    ("texts missing (typo)", "cls", "POST", "/v1/classify", {"text": ["a"]}, {}, 422),
    ("empty batch", "cls", "POST", "/v1/classify", {"texts": []}, {}, 422),
    ("pair of 3 texts", "cls", "POST", "/v1/classify", {"texts": [["a", "b", "c"]]}, {}, 422),
    ("pairs mixed with texts", "cls", "POST", "/v1/classify", {"texts": [["a", "b"], "c"]}, {}, 422),
    ("too many texts", "cls", "POST", "/v1/classify", {"texts": ["a"] * 9}, {}, 413),
    ("text too long", "cls", "POST", "/v1/classify", {"texts": ["ok", LONG]}, {}, 413),
    ("huge body (Content-Length)", "cls", "POST", "/v1/classify", {"texts": ["a" * 300_000]}, {}, 413),
    ("huge body (chunked)", "cls", "POST", "/v1/classify", "chunked", {}, 413),
    ("missing token", "cls", "POST", "/v1/classify", {"texts": ["a"]}, {"Authorization": None}, 401),
    ("wrong token", "cls", "POST", "/v1/classify", {"texts": ["a"]}, {"Authorization": "Bearer nope"}, 401),
    ("unknown route", "cls", "POST", "/v1/clasify", {"texts": ["a"]}, {}, 404),
    ("trailing slash", "cls", "POST", "/v1/classify/", {"texts": ["a"]}, {}, 404),
    ("wrong method", "cls", "GET", "/v1/classify", None, {}, 405),
    ("generate on a classifier", "cls", "POST", "/v1/generate", {"prompt": "hi"}, {}, 400),
    ("classify on a decoder", "gen", "POST", "/v1/classify", {"texts": ["a"]}, {}, 400),
    ("negative max_new_tokens", "gen", "POST", "/v1/generate", {"prompt": "hi", "max_new_tokens": -5}, {}, 422),
    ("max_new_tokens over limit", "gen", "POST", "/v1/generate", {"prompt": "hi", "max_new_tokens": 65}, {}, 422),
    ("max_new_tokens not a number", "gen", "POST", "/v1/generate", {"prompt": "hi", "max_new_tokens": "ten"}, {}, 422),
    ("temperature NaN", "gen", "POST", "/v1/generate", b'{"prompt": "hi", "temperature": NaN}', {}, 422),
    ("temperature 5", "gen", "POST", "/v1/generate", {"prompt": "hi", "temperature": 5}, {}, 422),
    ("5 stop strings", "gen", "POST", "/v1/generate", {"prompt": "hi", "stop": list("abcde")}, {}, 422),
    ("prompt too long", "gen", "POST", "/v1/generate", {"prompt": LONG}, {}, 413),
    ("chat: no messages", "gen", "POST", CHAT, {"messages": []}, {}, 422),
    ("chat: tool role", "gen", "POST", CHAT, {"messages": [{"role": "tool", "content": "x"}]}, {}, 422),
    ("chat: ends with assistant", "gen", "POST", CHAT, {"messages": [{"role": "assistant", "content": "x"}]}, {}, 422),
    ("chat: n=2", "gen", "POST", CHAT, {"messages": [{"role": "user", "content": "x"}], "n": 2}, {}, 422),
    ("chat: max_tokens 0", "gen", "POST", CHAT, {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, {}, 422),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_request_gets_4xx_json(case, cls_client, gen_client):
    name, app, method, path, body, extra, status = case
    c = cls_client if app == "cls" else gen_client
    headers = {**AUTH, **{k: v for k, v in extra.items() if v is not None}}
    if extra.get("Authorization", "") is None:
        headers.pop("Authorization")
    if body == "chunked":  # no Content-Length: the limit is counted while the body streams in
        r = c.request(method, path, content=(b"x" * 65536 for _ in range(8)),
                      headers=headers | {"Content-Type": "application/json"})
    elif isinstance(body, bytes):
        r = c.request(method, path, content=body, headers={"Content-Type": "application/json"} | headers)
    else:
        r = c.request(method, path, json=body, headers=headers) if body is not None else c.request(method, path,
                                                                                                   headers=headers)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and len(err["message"]) > 5 and err["type"]
    assert len(HOSTILE) >= 12
