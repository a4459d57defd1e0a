"""The gateway's Prometheus metrics, served at ``GET /metrics`` on its HTTP port (no API key, as
vLLM serves its own: a scraper has none, and nothing in it names a tenant, a prompt or a key).

What only the gateway sees: requests refused or failed before or at Submit (validation,
admission, no worker), requests their clients abandoned, streams that failed after Submit, and the
latency as the gateway observed it (its arrival stamp to the token received here, so the
scheduler's queueing, its Redis write and the hop are in it). Each request counts once, with one
outcome (``RequestMeter``); ``finished`` requests also count in ``..._slo_met_total`` when they
met their SLO by the rule of ``accelgen load`` (``ActiveRequest._slo_met``).

The scheduler's own metrics (``scheduler_service.metrics``) are the authority on attainment per
class: every request is there whatever gateway it came through.

``app_class`` label values are bounded: a class the scheduler does not know is ``other``.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Awaitable, Callable, Iterable, TypeVar

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram

from accelgen.common.metrics_http import render

from gateway.errors import status_of

PREFIX = "accelgen_gateway_"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 3600.0)
REFUSED_CODES = frozenset({"RESOURCE_EXHAUSTED"})  # admission, queue full, a key's limits: "come back later"

T = TypeVar("T")


class GatewayMetrics:
    """The gateway's metrics in a registry of its own; ``classes`` names the known classes."""

    def __init__(self, classes: Callable[[], Iterable[str]] = tuple,
                 registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.classes = classes
        r = self.registry
        self.requests = Counter(PREFIX + "requests", "Requests by class and outcome: finished, refused (429 / "
                                "RESOURCE_EXHAUSTED: admission, queue full, key limits), cancelled (the client "
                                "left or cancelled), error (status code in `code`) "
                                "(vllm:request_success_total counts the finished ones)",
                                ["app_class", "outcome", "code"], registry=r)
        self.slo_met = Counter(PREFIX + "requests_slo_met", "Finished requests that met their SLO as this "
                               "gateway measured them (same rule as the scheduler's)", ["app_class"], registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Arrival at the gateway to the first "
                              "token received from the scheduler, per class (vllm:time_to_first_token_seconds, "
                              "seen from the front end)", ["app_class"], buckets=TTFT_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Arrival at the gateway to the last token "
                             "received, finished requests (vllm:e2e_request_latency_seconds)", ["app_class"],
                             buckets=E2E_BUCKETS, registry=r)
        self.output_tokens = Counter(PREFIX + "output_tokens", "Output tokens streamed to clients "
                                     "(vllm:generation_tokens_total)", ["app_class"], registry=r)

    def label(self, app_class: str) -> str:
        return app_class if app_class in set(self.classes()) else "other"

    def count(self, app_class: str, outcome: str, code: str) -> None:
        self.requests.labels(self.label(app_class), outcome, code).inc()

    def failed(self, app_class: str, exc: BaseException) -> None:
        """A request refused or failed with ``exc`` (its status decides refused or error)."""
        code = status_of(exc)[0].name
        self.count(app_class, "refused" if code in REFUSED_CODES else "error", code)

    def meter(self, app_class: str, arrival_s: float) -> "RequestMeter":
        return RequestMeter(self, self.label(app_class), arrival_s)

    def render(self) -> bytes:
        return render(self.registry)


class RequestMeter:
    """One submitted request's metrics: each request ends with exactly one outcome."""

    __slots__ = ("m", "app_class", "arrival_s", "_first", "_ended")

    def __init__(self, metrics: GatewayMetrics | None, app_class: str, arrival_s: float) -> None:
        self.m = metrics
        self.app_class = app_class
        self.arrival_s = arrival_s
        self._first = False
        self._ended = metrics is None

    def tokens(self, n: int) -> None:
        """``n`` tokens received (the first of them: TTFT)."""
        if self.m is None or not n:
            return
        if not self._first:
            self._first = True
            self.m.ttft.labels(self.app_class).observe(max(0.0, time.time() - self.arrival_s))
        self.m.output_tokens.labels(self.app_class).inc(n)

    def finished(self, slo_met: bool) -> None:
        if self._end():
            self.m.requests.labels(self.app_class, "finished", "OK").inc()  # type: ignore[union-attr]
            self.m.e2e.labels(self.app_class).observe(max(0.0, time.time() - self.arrival_s))  # type: ignore[union-attr]
            if slo_met:
                self.m.slo_met.labels(self.app_class).inc()  # type: ignore[union-attr]

    def failed(self, exc: BaseException) -> None:
        if self._end():
            self.m.failed(self.app_class, exc)  # type: ignore[union-attr]

    def abandoned(self) -> None:
        if self._end():
            self.m.requests.labels(self.app_class, "cancelled", "CANCELLED").inc()  # type: ignore[union-attr]

    def _end(self) -> bool:
        if self._ended:
            return False
        self._ended = True
        return True


NO_METER = RequestMeter(None, "", 0.0)  # a request nobody counts here (an Attach: its first gateway did)


def counts_failures(app_class_of: Callable[[Any, Any], str]) -> Callable[[Callable[..., Awaitable[T]]],
                                                                   Callable[..., Awaitable[T]]]:
    """Decorate a ``GenerationService`` step (prepare, start): a request it refuses or fails is
    counted under the class ``app_class_of(service, first argument)`` before the error goes on."""

    def wrap(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        @functools.wraps(fn)
        async def counted(self: Any, first: Any, *args: Any, **kwargs: Any) -> T:
            try:
                return await fn(self, first, *args, **kwargs)
            except Exception as exc:
                self.metrics.failed(app_class_of(self, first), exc)
                raise

        return counted

    return wrap


def add_metrics_route(app: FastAPI, metrics: GatewayMetrics) -> None:
    """``GET /metrics``; ``openai_http.OPEN_PATHS`` lets it through without an API key."""

    @app.get("/metrics", include_in_schema=False)
    async def scrape() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
