"""The worker's Prometheus metrics: what its device did, as the worker itself measured it.

The scheduler exports the same iterations from its side (``accelgen_scheduler_iteration_seconds``,
from the ``elapsed_s`` each result carries); the worker's own histogram is there to tell a slow
device from a slow link: both should agree, and a gap between the worker's count of plans and the
scheduler's count of iterations is plans lost on the way. Gauges (KV blocks, registered, up) are
read at scrape time. The process serves them on ``metrics_port`` (``worker_service.main``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from accelgen.common.grpc_server import CannotListen
from accelgen.common.metrics_http import MetricsServer, start_metrics_server
from accelgen.core.worker_info import WorkerInfo
from worker_service.plan import ExecResult, WorkerPlan

PREFIX = "accelgen_worker_"
ITERATION_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                     0.2, 0.3, 0.5, 1.0, 2.5)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class WorkerMetrics:
    """Every worker metric, in a registry of its own (``registry``)."""

    def __init__(self, worker_id: str, info: WorkerInfo, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.worker_id = worker_id
        self.info = info
        self.registered: Callable[[], bool] = lambda: False  # worker_service.main ties it to its registration
        self.draining: Callable[[], bool] = lambda: False
        self.consecutive_failures: Callable[[], int] = lambda: 0  # worker_service.server ties these to its runner
        self.device_failed: Callable[[], bool] = lambda: False
        r = self.registry
        self.iteration = Histogram(PREFIX + "iteration_seconds", "Model time of one plan on this worker's "
                                   "executor (vllm:model_execute_time_milliseconds, in seconds)",
                                   buckets=ITERATION_BUCKETS, registry=r)
        self.tokens = Histogram(PREFIX + "iteration_tokens", "Tokens computed per plan (prefill chunks and "
                                "decodes) (vllm:iteration_tokens_total)", buckets=TOKEN_BUCKETS, registry=r)
        self.plans = Counter(PREFIX + "plans", "Plans received, by outcome: OK, INVALID_ARGUMENT (contradicts "
                             "this worker's state), FAILED_PRECONDITION (a deposed scheduler's), INTERNAL (the "
                             "executor crashed), UNAVAILABLE (device failed), ABORTED (behind a failed plan)",
                             ["code"], registry=r)
        self.sampled = Counter(PREFIX + "sampled_tokens", "Tokens sampled (one per decode or last prefill chunk)",
                               registry=r)
        self._ok = self.plans.labels("OK")
        r.register(_WorkerCollector(self))

    def follow(self, worker_id: str, registration: Any) -> None:
        """Name the worker and read its registration (``registered``, ``draining``) at scrape time."""
        self.worker_id = worker_id
        self.registered = registration.registered.is_set
        draining = getattr(registration, "draining", None)
        if draining is not None:
            self.draining = draining.is_set

    def done(self, plan: WorkerPlan, result: ExecResult) -> None:
        """One plan run."""
        self._ok.inc()
        self.iteration.observe(max(0.0, result.elapsed_s))
        self.tokens.observe(plan.num_tokens)
        sampled = len(result.sampled_token_ids)
        if sampled:
            self.sampled.inc(sampled)

    def failed(self, status: tuple[grpc.StatusCode, str]) -> tuple[grpc.StatusCode, str]:
        """One plan refused or failed with ``status``, returned unchanged (for ``context.abort``)."""
        self.plans.labels(status[0].name).inc()
        return status


class _WorkerCollector(Collector):
    def __init__(self, metrics: WorkerMetrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        m, info = self.m, self.m.info
        labels = ["worker"]
        about = GaugeMetricFamily(PREFIX + "info", "Always 1: what this worker serves", labels=[
            "worker", "executor", "model", "block_size"])
        about.add_metric([m.worker_id, info.executor, info.model, str(info.block_size)], 1.0)
        yield about
        for name, help_, value in (
            ("kv_blocks_total", "KV blocks this worker holds (the scheduler allocates from them)",
             max(0, info.num_blocks - 1)),
            ("registered", "1 while a scheduler knows this worker (registered, heartbeats answered)",
             1.0 if m.registered() else 0.0),
            ("draining", "1 while the worker drains: the scheduler routes it nothing new", 1.0 if m.draining() else 0.0),
            ("up", "1 while the process serves (its device not declared failed)",
             0.0 if m.device_failed() else 1.0),
            ("consecutive_failures", "Executor failures in a row (max_device_failures declares the device failed)",
             float(m.consecutive_failures())),
        ):
            g = GaugeMetricFamily(PREFIX + name, help_, labels=labels)
            g.add_metric([m.worker_id], value)
            yield g


async def start_worker_metrics(metrics: WorkerMetrics, host: str, port: int | None, port_offset: int = 0
                               ) -> MetricsServer | None:
    """Serve ``metrics`` on ``port + port_offset`` (0: a free port; None: not at all). A port that
    cannot be bound is ``CannotListen``: a configuration error, exit status 2."""
    if port is None:
        return None
    listen_port = port + port_offset if port else 0
    try:
        return await start_metrics_server(metrics.registry, host, listen_port)
    except OSError as exc:
        raise CannotListen(f"cannot serve metrics on {host}:{listen_port}: {exc.strerror or exc}; "
                           "set metrics_port to a free port") from None
