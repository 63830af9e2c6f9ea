"""uvicorn's httptools protocol with the limits it lacks: header size, header time, open connections.

Measured against uvicorn 0.54 + httptools (issue 15): a 1 MB header was accepted, a client that sent half a
request was held for as long as it liked, and 300 such connections were all held at once. Here each connection:
  - gets `max_header_bytes` for its request line and headers, else 431 and close (counted as bytes arrive, so
    memory stays bounded: httptools would buffer the whole head before any callback);
  - must finish them within `header_timeout_s` of connecting (or of starting the next keep-alive request), else
    408 and close;
  - is refused with 503 and closed at once when `max_connections` are already open.
The body has its own time limit in app.py (BodyLimit), where the ASGI receive loop is.
"""
from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def _answer(status: str, message: str) -> bytes:
    body = ('{"error": {"message": "%s", "type": "%s"}}' % (message, status.split(" ", 1)[1].lower()
                                                            .replace(" ", "_"))).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n").encode() + body


def guarded_protocol(*, max_header_bytes: int, header_timeout_s: float, max_connections: int) -> type:
    """An HttpToolsProtocol subclass bound to these limits (uvicorn.Config(http=...) takes a class)."""

    class Guarded(HttpToolsProtocol):
        def connection_made(self, transport):  # type: ignore[override]
            super().connection_made(transport)
            self._head_bytes, self._in_head, self._refused = 0, True, False
            self._timer: asyncio.TimerHandle | None = None
            if len(self.connections) > max_connections:
                self._refuse("503 Service Unavailable", f"server busy: {max_connections} connections are open "
                                                        f"(--max-connections); retry later")
                return
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._timer = asyncio.get_running_loop().call_later(header_timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _too_slow(self) -> None:
            if self._in_head and not self.transport.is_closing():
                self._refuse("408 Request Timeout", f"request headers not received within {header_timeout_s:g} s "
                                                    f"(--header-timeout-s)")

        def _refuse(self, status: str, message: str) -> None:
            """Answer, stop writing, and close a moment later: closing with the client's request unread would
            send a TCP reset, which can destroy the answer before the client reads it."""
            self._disarm()
            self._in_head, self._refused = False, True
            self.transport.write(_answer(status, message))
            if self.transport.can_write_eof():
                self.transport.write_eof()
            asyncio.get_running_loop().call_later(1.0, self.transport.close)

        def data_received(self, data: bytes) -> None:
            if self.transport.is_closing() or getattr(self, "_refused", False):
                return  # a refused connection's bytes are read and dropped until it closes
            if self._in_head:
                self._head_bytes += len(data)
                if self._head_bytes > max_header_bytes and not self._head_done_within(data):
                    self._refuse("431 Request Header Fields Too Large",
                                 f"request line and headers over {max_header_bytes} bytes (--max-header-bytes)")
                    return
            super().data_received(data)

        def _head_done_within(self, data: bytes) -> bool:
            """The head ends in this chunk within the limit (the rest of the chunk is body)."""
            end = data.find(b"\r\n\r\n")
            return end >= 0 and self._head_bytes - len(data) + end + 4 <= max_header_bytes

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if not self._in_head:  # the next request on a keep-alive connection
                self._in_head, self._head_bytes = True, 0
                self._arm()

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return Guarded
