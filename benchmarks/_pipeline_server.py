"""The baseline of benchmarks/serve_load.py: the "plain" way to serve a classifier over HTTP.

    python benchmarks/_pipeline_server.py --model DIR --host 127.0.0.1 --port P [--token T] [--threads N]
                                          [--handler sync|async]

One `transformers.pipeline("text-classification", model=DIR)` loaded once at start, a FastAPI app under uvicorn,
the same contract as `sftlab serve`: `POST /v1/classify {"texts": [...]}` answers
`{"predictions": [{"label": ..., "score": ...}, ...]}` in input order, `GET /health` answers 200.

Requests are served one at a time. Default `--handler sync`: a plain `def` handler (FastAPI runs it in its thread
pool) that calls the pipeline under a lock, so HTTP parsing on the event loop overlaps the one running inference
while no two pipeline calls run at once. `--handler async`: an `async def` handler that calls the pipeline
directly, blocking the event loop for the whole call (the other common way to write it). On the 2-core dev machine
the two were within noise of each other at 1 torch thread (sync 46 / 41 req/s, async 59 / 34), and async collapsed
at 2 threads (3.9 req/s vs sync 34), so sync is the default: the stronger baseline.
Uvicorn's access log is off, which only makes the baseline faster than the plain default.
"""

from __future__ import annotations

import argparse
import os
import threading

from fastapi import FastAPI, Header, HTTPException
from pydantic import BaseModel


class ClassifyRequest(BaseModel):
    texts: list[str]


def build_app(model_dir: str, token: str | None, handler: str, max_length: int | None) -> FastAPI:
    from transformers import pipeline

    pipe = pipeline("text-classification", model=model_dir, device="cpu")
    call_kwargs = {"truncation": True, **({"max_length": max_length} if max_length else {})}
    lock = threading.Lock()
    app = FastAPI()

    def check(authorization: str | None) -> None:
        if token and authorization != f"Bearer {token}":
            raise HTTPException(status_code=401, detail="bad or missing token")

    def classify(texts: list[str]) -> dict:
        out = pipe(texts, **call_kwargs) if texts else []
        return {"predictions": [{"label": p["label"], "score": float(p["score"])} for p in out]}

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    if handler == "sync":
        @app.post("/v1/classify")
        def classify_sync(req: ClassifyRequest, authorization: str | None = Header(default=None)) -> dict:
            check(authorization)
            with lock:
                return classify(req.texts)
    else:
        @app.post("/v1/classify")
        async def classify_async(req: ClassifyRequest, authorization: str | None = Header(default=None)) -> dict:
            check(authorization)
            return classify(req.texts)

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--token", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    p.add_argument("--handler", choices=("sync", "async"), default="sync")
    p.add_argument("--max-length", type=int, default=None, help="truncate inputs to this many tokens")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import uvicorn

    if args.threads:
        torch.set_num_threads(args.threads)
    app = build_app(args.model, args.token, args.handler, args.max_length)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
