"""The gateway's own Prometheus metrics (a registry per app, names prefixed ``llmos_gateway_``) and the ASGI
middleware that counts every request: by endpoint and HTTP status, its latency to the response's last
byte (a stream's end), and the requests in flight; the gateway process's own ``process_*``. The time to
first token is observed by the runs."""

from __future__ import annotations

import re
import time
from typing import Any, Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from starlette.requests import ClientDisconnect

CLIENT_CLOSED = 499  # the status nginx logs for a request whose client went away first
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/sessions", "/health", "/metrics")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_PROCESS_LINE = re.compile(r"(# (HELP|TYPE) )?process_")


def endpoint_of(path: str) -> str:
    """The label for a path: one of ENDPOINTS (a model or session id under it counts as it), else "other"
    (a label per unknown path would let any client grow the registry without bound)."""
    for e in ENDPOINTS:
        if path == e or path.startswith(e + "/"):
            return e
    return "other"


class GatewayMetrics:
    """The gateway's own registry: requests by endpoint and status, request latency and time to first token
    (histograms, seconds), requests in flight, and the gateway process's own ``process_*`` (CPU seconds,
    memory bytes, open files, start time: prometheus_client's ProcessCollector)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.requests = Counter("llmos_gateway_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("llmos_gateway_request_duration_seconds", "time from a request's arrival to the "
                                 "last byte of its response (a stream's end)", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("llmos_gateway_time_to_first_token_seconds", "time from a generation request's "
                              "arrival to its first output from the kernel, as the gateway sees it", ["endpoint"],
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("llmos_gateway_requests_in_flight", "requests being answered now", ["endpoint"],
                               registry=self.registry)

    def text(self) -> str:
        """The registry in the Prometheus text format (version 0.0.4), as /metrics serves it first."""
        return generate_latest(self.registry).decode("utf-8")


def without_process_families(text: str) -> str:
    """Prometheus text without its ``process_*`` families (HELP, TYPE and samples): the kernel's, relayed
    after the gateway's own, would otherwise read as the gateway process's (or repeat its names)."""
    return "".join(line for line in text.splitlines(keepends=True) if not _PROCESS_LINE.match(line))


Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]


class MetricsMiddleware:
    """Counts each HTTP request once its response ended, by its status; a client that went away before the
    response's last byte is 499 (as nginx names a request closed by the client), whether the response was
    not begun (a non-streamed request) or under way (a cut stream: its 200 was sent already)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = endpoint_of(scope.get("path", ""))
        state = {"code": CLIENT_CLOSED, "complete": False, "gone": False}
        started = time.monotonic()

        async def watching_receive() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "http.disconnect" and not state["complete"]:
                state["gone"] = True
            return message

        async def counting_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                state["code"] = message["status"]
            try:
                await send(message)
            except OSError:  # an ASGI 2.4 server says a gone client so (starlette: ClientDisconnect)
                state["gone"] = True
                raise
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                state["complete"] = True

        self.metrics.in_flight.labels(endpoint).inc()
        try:
            await self.app(scope, watching_receive, counting_send)
        except Exception as exc:  # answered 500 by the server-error middleware outside this one, unless under way
            if isinstance(exc, ClientDisconnect):
                state["gone"] = True
            elif state["code"] == CLIENT_CLOSED:
                state["code"] = 500
            raise
        finally:
            self.metrics.in_flight.labels(endpoint).dec()
            # gone is decided when the disconnect arrives: what is sent after it reaches nobody (uvicorn drops it)
            code = CLIENT_CLOSED if state["gone"] else state["code"]
            self.metrics.requests.labels(endpoint, str(code)).inc()
            self.metrics.latency.labels(endpoint).observe(time.monotonic() - started)
