"""Issue 15, the server's slow and loose edges, on a real uvicorn server over loopback: a half-sent body or header
is cut off with 408, a huge header gets 431, connections past the limit get 503, and a busy port is one line
before any model loads."""
from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from sftlab.cli import main
from sftlab.serve import ServeSettings, create_app
from sftlab.serve.backend import Classifier
from sftlab.serve.server import http_protocol


def fake_backend():
    return Classifier(lambda texts, pairs=None: np.zeros((len(texts), 2), dtype=np.float32),
                      {"task": "classification", "labels": ["a", "b"]}, name="fake")


@pytest.fixture(scope="module")
def server():
    import uvicorn

    s = ServeSettings(port=0, header_timeout_s=0.6, body_timeout_s=0.6, max_connections=8, max_header_bytes=4096)
    config = uvicorn.Config(create_app(fake_backend(), s), host="127.0.0.1", port=0, log_level="error",
                            lifespan="on", http=http_protocol(s))
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield port
    srv.should_exit = True
    thread.join(10)


def talk(port: int, data: bytes, wait: float = 3.0) -> tuple[bytes, float]:
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(wait)
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(4096):
                out += chunk
        except TimeoutError:
            pass
    return out, time.monotonic() - t0


BODY = b'{"texts": ["a"]}'
HEAD = (b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        % len(BODY))


def test_a_whole_request_is_answered(server):
    out, _ = talk(server, HEAD + BODY + b"", wait=1.0)
    assert out.startswith(b"HTTP/1.1 200")


def test_a_half_sent_body_is_cut_off_with_408(server):
    out, took = talk(server, HEAD + BODY[:5])
    assert out.startswith(b"HTTP/1.1 408") and b"--body-timeout-s" in out and took < 2.5


def test_half_sent_headers_are_cut_off_with_408(server):
    out, took = talk(server, b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n")
    assert out.startswith(b"HTTP/1.1 408") and b"--header-timeout-s" in out and took < 2.5


def test_a_huge_header_gets_431(server):
    out, _ = talk(server, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431")


def test_connections_past_the_limit_get_503(server):
    held = [socket.create_connection(("127.0.0.1", server)) for _ in range(8)]
    try:
        time.sleep(0.1)
        out, took = talk(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 503") and took < 1.0
    finally:
        for s in held:
            s.close()
    time.sleep(0.2)
    assert talk(server, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")[0].startswith(b"HTTP/1.1 200")


def test_busy_port_is_one_line_before_the_model_loads(capsys, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        t0 = time.monotonic()
        # the folder does not even exist: the port is checked first
        assert main(["serve", str(tmp_path / "nope"), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already in use" in err[0] and time.monotonic() - t0 < 5
