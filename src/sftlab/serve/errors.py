"""Errors a request can cause. Each becomes `{"error": {"message": ..., "type": ...}}` with its status code."""
from __future__ import annotations


class ApiError(Exception):
    """A 4xx (or 503/504) answer: `message` says what was wrong and what to do instead."""

    def __init__(self, status: int, message: str, type: str = "invalid_request", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.headers = status, message, type, headers


class QueueFull(ApiError):
    def __init__(self, what: str):
        super().__init__(429, f"server busy: {what}; retry later", "queue_full", {"Retry-After": "1"})


class Timeout(ApiError):
    def __init__(self, seconds: float):
        super().__init__(504, f"request took longer than the time limit ({seconds:g} s, --timeout-s); its work was "
                              f"cancelled", "timeout")


class ShuttingDown(ApiError):
    def __init__(self):
        super().__init__(503, "server is shutting down", "unavailable")
