"""Run the app under uvicorn: one process, one event loop, one inference thread (batching needs one queue).

Prints `sftlab serve: ready on http://HOST:PORT` on stderr once the socket listens (with --port 0, the port the
OS chose). SIGTERM / Ctrl-C: stop accepting, finish in-flight requests (up to 10 s), exit 0.
"""
from __future__ import annotations

import signal
import sys

from .settings import ServeSettings


def check_port(host: str, port: int) -> None:
    """One `sftlab: error:` line (exit 2) when the address cannot be bound, found before the model loads."""
    import errno
    import socket

    from ..errors import ConfigError

    if port == 0:
        return
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ConfigError(f"serve --host {host}: cannot resolve it ({e.strerror}); use an address such as "
                          f"127.0.0.1 or 0.0.0.0") from None
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a TIME_WAIT port is free
        try:
            sock.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"serve --port {port}: {host}:{port} is already in use; stop what runs there or "
                                  f"pick another port (--port 0 takes any free one)") from None
            raise ConfigError(f"serve --host {host} --port {port}: cannot bind ({e.strerror or e})") from None


def http_protocol(settings: ServeSettings):
    """httptools with header size/time and connection limits (protocol.py); uvicorn's h11 where it is missing."""
    try:
        from .protocol import guarded_protocol
    except ImportError:  # no httptools: h11 keeps its own header size limit (h11_max_incomplete_event_size)
        return "h11"
    return guarded_protocol(max_header_bytes=settings.max_header_bytes, header_timeout_s=settings.header_timeout_s,
                            max_connections=settings.max_connections)


def serve(path: str, settings: ServeSettings) -> None:
    import uvicorn

    from .app import create_app

    if not settings.loopback and not settings.token:
        print(f"sftlab serve: WARNING: binding {settings.host} without a token: anyone who can reach this port can "
              f"use the model; pass --token or set SFTLAB_SERVE_TOKEN", file=sys.stderr)
    check_port(settings.host, settings.port)  # before the model loads: a busy port fails in a second, not after it
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
                            timeout_graceful_shutdown=10, server_header=False, lifespan="on",
                            http=http_protocol(settings), h11_max_incomplete_event_size=settings.max_header_bytes)
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
