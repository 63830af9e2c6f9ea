"""`create_app(dir, settings)`: the FastAPI app. Routes, bearer auth, limits, and JSON errors for everything.

Every answer that is not a success is `{"error": {"message": ..., "type": ...}}` with a 4xx status (or 503/504
for an overloaded or slow server); a 500 means a bug or a broken model, never bad input. Bodies are read and
parsed here (not by FastAPI) so that each way a body can be wrong gets its own status and message: too big 413,
not JSON-typed 415, not UTF-8 / not JSON 400, wrong shape 422.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from .backend import Classifier, Generator, load_backend
from .batcher import GenerationQueue, MicroBatcher, _call_soon
from .errors import ApiError, Timeout
from .metrics import Metrics, MetricsMiddleware
from .schemas import ChatRequest, ClassifyRequest, GenerateRequest
from .settings import ServeSettings

log = logging.getLogger("sftlab.serve")
ROUTES = {"/health": "GET", "/metrics": "GET", "/v1/models": "GET", "/v1/tasks": "GET", "/v1/classify": "POST",
          "/v1/generate": "POST", "/v1/chat/completions": "POST"}


def create_app(source: str | Path | Classifier | Generator, settings: ServeSettings | None = None) -> FastAPI:
    """`source`: an export folder or run directory (loaded now, so a bad one fails before binding), or a ready
    backend object (tests pass fakes)."""
    s = settings or ServeSettings()
    backend = source if hasattr(source, "kind") else load_backend(
        source, precision=s.precision, batch_tokens=s.batch_tokens, threads=s.torch_threads)
    metrics = Metrics()
    rt: dict[str, Any] = {}
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(s.torch_threads)  # process-wide; given back at shutdown (in-process use, tests)
        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sftlab-infer")
        rt["batcher"] = MicroBatcher(backend.predict if backend.kind == "classify" else _no_batching, executor,
                                     max_batch_size=s.max_batch_size, max_wait_ms=s.max_wait_ms,
                                     max_queue=s.max_queue, timeout_s=s.timeout_s, metrics=metrics)
        rt["genq"] = GenerationQueue(executor, max_queue=s.max_queue_generate, timeout_s=s.timeout_s)
        metrics.watch_queue("classify", lambda: rt["batcher"].queue_depth)
        metrics.watch_queue("generate", lambda: rt["genq"].depth)
        rt["batcher"].start()
        await asyncio.get_running_loop().run_in_executor(executor, _warm_up, backend)
        try:
            yield
        finally:
            rt["genq"].stop()
            await rt["batcher"].stop()
            executor.shutdown(wait=False, cancel_futures=True)
            torch.set_num_threads(threads)

    # No OpenAPI pages (they would be open without the token); FastAPI's OpenTelemetry hooks off: its per-request
    # "is telemetry configured?" check cost ~0.2 ms a request in a profile, and /metrics covers what it would give.
    app = FastAPI(title="sftlab serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False, telemetry={"tracing": False, "metrics": False, "logs": False})
    app.state.backend, app.state.settings, app.state.metrics, app.state.runtime = backend, s, metrics, rt
    _error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=s.max_body_bytes, timeout_s=s.body_timeout_s)
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=set(ROUTES))  # outermost: sees every answer
    auth = [Depends(_bearer(s.token))]

    def need(kind: str, route: str) -> None:
        if backend.kind != kind:
            other = ("/v1/generate or /v1/chat/completions" if backend.kind == "generate" else "/v1/classify")
            raise ApiError(400, f"{route} needs a {'classification or regression' if kind == 'classify' else 'causal_lm'}"
                                f" model; this server runs a {backend.task} model: use {other}", "wrong_model")

    def limit_chars(text: str, where: str) -> None:
        if len(text) > s.max_chars:
            raise ApiError(413, f"{where} is {len(text)} characters; at most {s.max_chars} (--max-chars)",
                           "payload_too_large")

    def new_tokens(asked: int | None, field: str) -> int:
        if asked is not None and asked > s.max_new_tokens:
            raise ApiError(422, f"{field}={asked} is over this server's limit of {s.max_new_tokens} "
                                f"(--max-new-tokens)")
        return asked if asked is not None else min(s.default_new_tokens, s.max_new_tokens)

    @app.get("/health")
    async def health():
        return {"status": "ok", "task": backend.task}

    @app.get("/v1/models", dependencies=auth)
    async def models():  # OpenAI's model list: the one model this server runs
        return {"object": "list", "data": [{"id": backend.name, "object": "model", "created": started,
                                            "owned_by": "sftlab", "task": backend.task}]}

    @app.get("/v1/tasks", dependencies=auth)
    async def list_tasks():  # a multitask model's heads; a single-task model is its own one task
        if backend.task == "multitask":
            return {"model": backend.name, "tasks": backend.describe()}
        labels = getattr(backend, "labels", None)
        return {"model": backend.name, "tasks": [{"name": backend.name, "task": backend.task, "labels": labels}]}

    @app.get("/metrics", dependencies=auth)
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.post("/v1/classify", dependencies=auth)
    async def classify(body: ClassifyRequest = Depends(json_body(ClassifyRequest))):
        need("classify", "/v1/classify")
        if len(body.texts) > s.max_texts:
            raise ApiError(413, f"{len(body.texts)} texts in one request; at most {s.max_texts} (--max-texts); "
                                f"split the batch", "payload_too_large")
        items = [(t, None) if isinstance(t, str) else t for t in body.texts]
        for i, (a, b) in enumerate(items):
            limit_chars(a, f"texts[{i}]" + ("[0]" if b is not None else ""))
            if b is not None:
                limit_chars(b, f"texts[{i}][1]")
        kind = backend.task
        if backend.task == "multitask":  # one head per request; the batcher groups a batch's items by task
            if body.task not in backend.tasks:
                names = ", ".join(backend.tasks)
                raise ApiError(404 if body.task is not None else 422,
                               (f"task {body.task!r} is not served here" if body.task is not None else
                                "this server runs a multitask model: say which task answers with \"task\"")
                               + f"; available tasks: {names} (GET /v1/tasks)", "unknown_task")
            items, kind = [(a, b, body.task) for a, b in items], backend.tasks[body.task].task
        elif body.task is not None:
            raise ApiError(422, f"\"task\": {body.task!r}, but this server runs one {backend.task} model; drop "
                                "\"task\"", "unknown_task")
        preds = await rt["batcher"].submit(items)
        if not body.all_scores or kind == "regression":
            preds = [{"label": p["label"], "score": p["score"]} for p in preds]
        return JSONResponse({"model": backend.name, "predictions": preds})

    async def prepare(messages: list[dict] | None, raw: str | None, max_new: int) -> list[int]:
        return await asyncio.to_thread(backend.encode, raw if raw is not None else messages, max_new)

    def job(ids, n, body, on_text=None):
        return partial(backend.generate, ids, max_new_tokens=n, temperature=body.temperature, top_p=body.top_p,
                       stop=body.stop, seed=body.seed, on_text=on_text)

    async def finished(handle) -> Any:
        result = await handle.result()
        if result.finish_reason == "timeout":
            raise Timeout(s.timeout_s)
        metrics.tokens.inc(result.completion_tokens)
        metrics.inference.labels(kind="generate").observe(result.seconds)
        return result

    @app.post("/v1/generate", dependencies=auth)
    async def generate(body: GenerateRequest = Depends(json_body(GenerateRequest))):
        need("generate", "/v1/generate")
        limit_chars(body.prompt, "prompt")
        if body.system is not None:
            limit_chars(body.system, "system")
        n = new_tokens(body.max_new_tokens, "max_new_tokens")
        msgs = ([{"role": "system", "content": body.system}] if body.system is not None else []) + \
            [{"role": "user", "content": body.prompt}]
        ids = await prepare(msgs, body.prompt if body.raw else None, n)
        r = await finished(rt["genq"].submit(job(ids, n, body)))
        return {"model": backend.name, "text": r.text, "finish_reason": r.finish_reason, "usage": _usage(r)}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(body: ChatRequest = Depends(json_body(ChatRequest))):
        need("generate", "/v1/chat/completions")
        if (refused := body.unsupported()) is not None:
            raise ApiError(422, refused, "unsupported")
        if len(body.messages) > s.max_messages:
            raise ApiError(413, f"{len(body.messages)} messages; at most {s.max_messages} (--max-messages)",
                           "payload_too_large")
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        for i, m in enumerate(msgs):
            limit_chars(m["content"], f"messages[{i}].content")
        if msgs[-1]["role"] == "assistant":
            raise ApiError(422, "messages: the last message is the assistant's; end with the user's message")
        field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        n = new_tokens(body.max_completion_tokens or body.max_tokens, field)
        ids = await prepare(msgs, None, n)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": cid, "created": created, "model": backend.name}
        if not body.stream:
            r = await finished(rt["genq"].submit(job(ids, n, body)))
            return head | {"object": "chat.completion", "usage": _usage(r), "choices": [
                {"index": 0, "message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason}]}
        loop, pieces = asyncio.get_running_loop(), asyncio.Queue()
        handle = rt["genq"].submit(job(ids, n, body, on_text=lambda t: _call_soon(loop, partial(pieces.put_nowait, t))))
        handle.future.add_done_callback(lambda _: pieces.put_nowait(None))
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return SSE(_stream(head, handle, pieces, usage, s.timeout_s, metrics), on_close=handle.cancel,
                   media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


# ------------------------------------------------------------------------------------------------- helpers


def _no_batching(items):
    raise ApiError(400, "this server runs a causal_lm model", "wrong_model")


def _warm_up(backend) -> None:
    """One tiny call so the first request does not pay for lazy initialisation."""
    try:
        if backend.kind == "classify":
            backend.predict([("warm up", None, *([next(iter(backend.tasks))] if backend.task == "multitask" else []))])
        else:
            backend.generate(backend.encode([{"role": "user", "content": "hi"}], 1), max_new_tokens=1)
    except Exception:  # noqa: BLE001 - a failing warm-up is logged; requests will show the error
        log.exception("warm-up call failed")


def _usage(r) -> dict:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            "total_tokens": r.prompt_tokens + r.completion_tokens}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(head: dict, handle, pieces: asyncio.Queue, include_usage: bool, timeout_s: float, metrics):
    """OpenAI chat.completion.chunk events; an error after the stream started is an {"error": ...} event.
    Always ends with `data: [DONE]`."""
    def chunk(delta: dict, finish: str | None = None) -> str:
        return _sse(head | {"object": "chat.completion.chunk",
                            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    yield chunk({"role": "assistant", "content": ""})
    error: ApiError | None = None
    while True:
        try:  # the thread stops itself at the deadline; the grace covers a job still queued then
            piece = await asyncio.wait_for(pieces.get(), max(handle.deadline - time.monotonic(), 0) + 1.0)
        except TimeoutError:
            handle.cancel()
            error = Timeout(timeout_s)
            break
        if piece is None:
            break
        yield chunk({"content": piece})
    if error is None and handle.future.cancelled():
        error = Timeout(timeout_s)
    elif error is None and handle.future.exception() is not None:
        e = handle.future.exception()
        error = e if isinstance(e, ApiError) else ApiError(500, f"generation failed: {type(e).__name__}",
                                                           "internal_error")
    if error is None:
        r = handle.future.result()
        if r.finish_reason == "timeout":
            error = Timeout(timeout_s)
        else:
            metrics.tokens.inc(r.completion_tokens)
            metrics.inference.labels(kind="generate").observe(r.seconds)
            yield chunk({}, r.finish_reason)
            if include_usage:
                yield _sse(head | {"object": "chat.completion.chunk", "choices": [], "usage": _usage(r)})
    if error is not None:
        yield _sse({"error": {"message": error.message, "type": error.type}})
    yield "data: [DONE]\n\n"


class SSE(StreamingResponse):
    """A StreamingResponse that runs `on_close` however it ends: finished, client gone, server stopping."""

    def __init__(self, *args, on_close, **kwargs):
        super().__init__(*args, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _bearer(token: str | None):
    expected = token.encode() if token else None

    async def require_token(request: Request) -> None:
        if expected is None:
            return
        header = request.headers.get("authorization")
        if not header:
            raise ApiError(401, "missing bearer token: send the header 'Authorization: Bearer <token>'",
                           "unauthorized", {"WWW-Authenticate": "Bearer"})
        scheme, _, given = header.partition(" ")
        # compare_digest on bytes: constant time in the token's length, and no TypeError for non-ASCII input
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8", "replace"), expected):
            raise ApiError(401, "invalid bearer token", "unauthorized", {"WWW-Authenticate": 'Bearer error="invalid_token"'})

    return require_token


def json_body(model: type[BaseModel]):
    """A dependency that reads the body as strict JSON and validates it into `model`."""

    async def parse(request: Request):
        ctype = request.headers.get("content-type", "")
        main = ctype.split(";")[0].strip().lower()
        # Requiring JSON also makes a browser preflight any cross-site POST (no "simple" form/text CSRF).
        if main != "application/json" and not (main.startswith("application/") and main.endswith("+json")):
            raise ApiError(415, f"Content-Type must be application/json, got {ctype[:100] or 'none'!r}",
                           "unsupported_media_type")
        raw = await request.body()
        if not raw.strip():
            raise ApiError(400, "empty body; send a JSON object", "invalid_json")
        try:
            data = json.loads(raw.decode("utf-8"), parse_int=_int, parse_constant=_no_constant)
        except UnicodeDecodeError as e:
            raise ApiError(400, f"body is not valid UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})",
                           "invalid_json") from None
        except json.JSONDecodeError as e:
            raise ApiError(400, f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}", "invalid_json") from None
        except RecursionError:
            raise ApiError(400, "invalid JSON: nested too deeply", "invalid_json") from None
        bad = _first_bad_value(data)
        if bad is not None:
            raise ApiError(422, bad)
        if not isinstance(data, dict):
            raise ApiError(422, f"body must be a JSON object, got a JSON {type(data).__name__}")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise ApiError(422, _readable(e.errors())) from None

    return parse


class _HugeInt(str):
    """An integer literal too long to be a number anything here could use (Python refuses past 4,300 digits)."""


_MAX_INT_DIGITS = 40  # 2**64 has 20 digits; anything this long is out of every field's range


def _int(s: str):
    return _HugeInt(s) if len(s.lstrip("-")) > _MAX_INT_DIGITS else int(s)


class _NonFinite(str):
    """NaN / Infinity / -Infinity: Python's JSON reader takes them, JSON does not."""


def _no_constant(name: str):
    return _NonFinite(name)


def _first_bad_value(data: Any) -> str | None:
    """A message for the first value no field can take: an integer of dozens of digits, NaN/Infinity, or a string
    that is not valid Unicode (a lone UTF-16 surrogate such as "\\ud800" is valid JSON but cannot be encoded, so a
    tokenizer fails on it). Checked before validation, so such a request never reaches a batch. Iterative: JSON
    nested ~1,000 deep parses, and a recursive walk on top of the server's stack would overflow."""
    stack: list[tuple[str, Any, bool]] = [("", data, False)]
    while stack:
        path, value, is_key = stack.pop()
        where = path or "body"
        if isinstance(value, _HugeInt):
            return f"{where}: integer of {len(value.lstrip('-'))} digits is out of range"
        if isinstance(value, _NonFinite):
            return f"{where}: {value} is not a finite number; send a JSON number"
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                what = "field name is not valid Unicode" if is_key else "not valid Unicode"
                return f"{where}: {what} (lone surrogate {value[e.start]!a} at character {e.start}); send UTF-8 text"
        elif isinstance(value, dict):
            for k, v in reversed(list(value.items())):
                at = f"{path}.{k}" if path else str(k)
                stack += [(at, v, False), (at, k, True)]  # the key is checked before its value
        elif isinstance(value, list):
            stack += [(f"{path}[{i}]", v, False) for i, v in reversed(list(enumerate(value)))]
    return None


def _readable(errors: list[dict], most: int = 3) -> str:
    """'texts: item 2 is a number; ...' from pydantic/FastAPI errors: field path, message, what was given."""
    parts = []
    for err in errors[:most]:
        loc = [p for p in err.get("loc", ()) if p != "body"]
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "body"
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        if err.get("type") == "missing":
            msg = "required field is missing"
        elif err.get("type") == "extra_forbidden":
            msg = "unknown field"
        elif err.get("type") not in ("value_error",) and "input" in err and not isinstance(err["input"], (dict, list)):
            msg += f" (got {json.dumps(err['input'])[:60]})"
        parts.append(f"{path}: {msg}")
    more = f" (and {len(errors) - most} more)" if len(errors) > most else ""
    return "; ".join(parts) + more


def _error_json(status: int, message: str, type_: str, headers: dict | None = None) -> JSONResponse:
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # messages may quote the client's text
    return JSONResponse({"error": {"message": message, "type": type_}}, status_code=status, headers=headers)


_TYPES = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
          413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_request", 429: "queue_full"}


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return _error_json(e.status, e.message, e.type, e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation(request, e: RequestValidationError):
        return _error_json(422, _readable(list(e.errors())), "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        path = request.url.path[:200]
        if e.status_code == 404:
            known = ", ".join(f"{m} {p}" for p, m in ROUTES.items())
            msg = f"no route {request.method} {path}; routes: {known}"
        elif e.status_code == 405:
            msg = f"{request.method} is not allowed on {path}; use {ROUTES.get(request.url.path, 'another method')}"
        else:
            msg = str(e.detail)
        return _error_json(e.status_code, msg, _TYPES.get(e.status_code, "error"), dict(e.headers or {}) or None)

    @app.exception_handler(Exception)
    async def internal(request, e: Exception):  # a bug or a broken model: logged with its traceback by the server
        return _error_json(500, f"internal error ({type(e).__name__}); see the server log", "internal_error")


class BodyLimit:
    """Pure ASGI: rejects a body over `max_bytes` with 413 - at once from Content-Length, or while counting the
    chunks of a chunked body - and one not received within `timeout_s` with 408 (a half-sent body held a connection
    for as long as the client liked), then hands the (buffered) body to the app."""

    def __init__(self, app, max_bytes: int, timeout_s: float = 10.0):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_big(int(declared), scope, receive, send)
        chunks, size = [], 0
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
            except TimeoutError:
                return await _error_json(408, f"request body not received within {self.timeout_s:g} s "
                                              f"(--body-timeout-s)", "timeout", {"Connection": "close"})(
                    scope, receive, send)
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._too_big(None, scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: http.disconnect when the client goes away

        await self.app(scope, replay, send)

    async def _too_big(self, declared: int | None, scope, receive, send):
        size = f"{declared} bytes" if declared is not None else "over the limit"
        await _error_json(413, f"request body is {size}; at most {self.max_bytes} bytes (--max-body-bytes)",
                          "payload_too_large", {"Connection": "close"})(scope, receive, send)
