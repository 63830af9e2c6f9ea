"""Run the app under uvicorn: one process, one event loop, one inference thread (batching needs one queue).

Prints `sftlab serve: ready on http://HOST:PORT` on stderr once the socket listens (with --port 0, the port the
OS chose). SIGTERM / Ctrl-C: stop accepting, finish in-flight requests (up to 10 s), exit 0.
"""
from __future__ import annotations

import signal
import sys

from .settings import ServeSettings


def serve(path: str, settings: ServeSettings) -> None:
    import uvicorn

    from .app import create_app

    if not settings.loopback and not settings.token:
        print(f"sftlab serve: WARNING: binding {settings.host} without a token: anyone who can reach this port can "
              f"use the model; pass --token or set SFTLAB_SERVE_TOKEN", file=sys.stderr)
    app = create_app(path, settings)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                shown = f"[{host}]" if ":" in host else host
                print(f"sftlab serve: {app.state.backend.task} model {app.state.backend.name!r} ready on "
                      f"http://{shown}:{port}", file=sys.stderr, flush=True)

    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=10, server_header=False, lifespan="on")
    server = Server(config)
    # uvicorn re-raises the signal that stopped it once it has shut down; a no-op handler makes that a clean exit 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:  # could not bind (port taken, ...): uvicorn logged why
        raise SystemExit(1)
    print("sftlab serve: stopped", file=sys.stderr)
