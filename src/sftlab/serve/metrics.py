"""Prometheus metrics, one registry per app (two apps in one process, as in tests, never share counters).

Names (all prefixed sftlab_):
  requests_total{route,status}            answered requests (route = the route's path, "other" for unknown paths)
  request_duration_seconds{route}         latency histogram, first byte in to last byte out
  batch_size                              texts per forward pass (classify) - > 1 means requests were merged
  inference_seconds{kind}                 seconds per forward pass (classify) or per generation (generate)
  queue_depth{kind}                       texts (classify) / requests (generate) waiting, read at scrape time
  generated_tokens_total                  completion tokens produced
"""
from __future__ import annotations

import time

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)

disable_created_metrics()  # no *_created series: they double the scrape and nobody graphs them

LATENCY_BUCKETS = (.002, .005, .01, .025, .05, .075, .1, .25, .5, .75, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("sftlab_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=r)
        self.latency = Histogram("sftlab_request_duration_seconds", "Request latency in seconds, by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("sftlab_batch_size", "Texts per forward pass (micro-batch size)",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.inference = Histogram("sftlab_inference_seconds", "Seconds per forward pass or generation",
                                   ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("sftlab_queue_depth", "Texts (classify) or requests (generate) waiting",
                                 ["kind"], registry=r)
        self.tokens = Counter("sftlab_generated_tokens", "Completion tokens generated", registry=r)

    def watch_queue(self, kind: str, depth) -> None:
        """`depth()` is read at every scrape."""
        self.queue_depth.labels(kind=kind).set_function(depth)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI: counts and times every HTTP request, whatever answered it (route, error handler, body limit)."""

    def __init__(self, app, metrics: Metrics, routes: set[str]):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None)
            if route is None:
                route = scope["path"] if scope["path"] in self.routes else "other"
            self.metrics.requests.labels(route=route, status=str(status[0])).inc()
            self.metrics.latency.labels(route=route).observe(time.perf_counter() - t0)
