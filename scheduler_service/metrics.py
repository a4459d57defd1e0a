"""The scheduler's Prometheus metrics: per-class outcomes, latencies and SLO attainment, and the
state of every lane (queue, KV blocks, iteration and decision times).

Why here and measured like this:

- **Attainment server-side, per class.** A request's SLO is judged with ``RequestRecord`` of
  ``accelgen.core.metrics``, the rule ``accelgen load`` and the simulator report: first token
  within TTFT of arrival, at most ``slo_tbt_tolerance`` of the later gaps over TBT (JCT: the whole
  job in time). Token times are the scheduler's own stamps (``emitted_at`` in ``TokenBatch``,
  taken when the lane applied the iteration) and arrival is the Submit's stamp, so the number
  does not depend on a gateway or a client. ``rate(..._slo_met_total) / rate(..._finished_total)``
  is attainment over any window; ``accelgen_scheduler_slo_attainment_ratio`` is the last
  ``ATTAINMENT_WINDOW_S`` seconds, for a quick look without PromQL.
- **Cheap on the hot path.** A lane calls ``LaneMetrics.applied`` once per iteration; it
  observes one TBT per token (prometheus_client's histogram, under a microsecond each) and keeps
  each live request's token times for the finish-time SLO check. Gauges (queue per class,
  running, KV blocks, workers) are read from the lanes at scrape time by ``_StateCollector``,
  which costs nothing between scrapes.
- **vLLM's meaning where vLLM has the number.** The help text names the ``vllm:`` metric each
  mirrors (TTFT, inter-token latency, e2e latency, running/waiting, KV usage, preemptions,
  successes); vLLM leaves goodput to the client, AccelGen exports it per class.

Label values are bounded: ``app_class`` is one of the scheduler's classes (a request with
another is refused at Submit), ``worker`` one of at most ``max_workers`` registered ids.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from accelgen.core.metrics import RequestRecord
from accelgen.core.request import Request, RequestStatus
from accelgen.core.slo import SLO, SLOCatalog

if TYPE_CHECKING:  # only for types: the registry is handed in, never imported at run time
    from accelgen.core.plan import BatchPlan
    from accelgen.core.scheduler import StepOutcome

PREFIX = "accelgen_scheduler_"
ATTAINMENT_WINDOW_S = 60.0
# Latencies users feel: a 10 ms TBT class to a 10 min batch job. TBT/ITL buckets are finer at the
# low end, where interactive SLOs (20-200 ms) sit.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
TBT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
               0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 3600.0)
ITERATION_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                     0.2, 0.3, 0.5, 1.0, 2.5)
DECISION_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


@dataclass(slots=True)
class _Track:
    """What a live request needs for its finish-time SLO check."""

    app_class: str
    slo: SLO
    arrival_s: float
    prompt_len: int
    times: list[float] = field(default_factory=list)


class SchedulerMetrics:
    """Every scheduler metric in one registry of its own (``registry``)."""

    def __init__(self, catalog: SLOCatalog | None = None, tbt_tolerance: float = 0.05,
                 state: "StateSource | None" = None, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.tbt_tolerance = tbt_tolerance
        self.classes = tuple(catalog.names) if catalog is not None else ()
        self._live: dict[str, _Track] = {}
        self._recent: dict[str, deque[tuple[float, bool]]] = {}  # class -> (finished at, met), last window
        r = self.registry
        cls = ["app_class"]
        self.finished = Counter(PREFIX + "requests_finished", "Requests finished by the scheduler, by class and "
                                "finish reason (stop, length) (vllm:request_success_total)",
                                cls + ["finish_reason"], registry=r)
        self.slo_met = Counter(PREFIX + "requests_slo_met", "Finished requests that met their SLO (the rule of "
                               "accelgen load: first token within TTFT, at most slo_tbt_tolerance of gaps late); "
                               "attainment = rate(this) / rate(requests_finished_total)", cls, registry=r)
        self.cancelled = Counter(PREFIX + "requests_cancelled", "Requests cancelled before they finished (client "
                                 "cancel, gateway gone) (vllm:request_success_total has no such reason: vLLM counts "
                                 "aborts in vllm:num_requests_* only)", cls, registry=r)
        self.refused = Counter(PREFIX + "requests_refused", "Submits refused, by class and gRPC status: "
                               "RESOURCE_EXHAUSTED (SLO-aware admission, queue full), FAILED_PRECONDITION (an SLO "
                               "no worker can meet), INVALID_ARGUMENT, UNAVAILABLE (no worker)", cls + ["code"],
                               registry=r)
        self.output_tokens = Counter(PREFIX + "output_tokens", "Output tokens generated "
                                     "(vllm:generation_tokens_total)", cls, registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of finished requests "
                                     "(vllm:prompt_tokens_total counts them at prefill)", cls, registry=r)
        self.goodput_tokens = Counter(PREFIX + "goodput_tokens", "Output tokens of requests that met their SLO "
                                      "(request goodput, as vllm bench serve --goodput; vLLM exports none)", cls,
                                      registry=r)
        self.on_time_tokens = Counter(PREFIX + "on_time_tokens", "Output tokens on time (own bound met and the "
                                      "stream started on time): the paper's token goodput", cls, registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Arrival at the scheduler to the first "
                              "token applied, per class (vllm:time_to_first_token_seconds)", cls,
                              buckets=TTFT_BUCKETS, registry=r)
        self.tbt = Histogram(PREFIX + "inter_token_latency_seconds", "Time between consecutive output tokens "
                             "of a request, per class: the TBT the SLO bounds (vllm:inter_token_latency_seconds)",
                             cls, buckets=TBT_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Arrival to finish of finished requests "
                             "(vllm:e2e_request_latency_seconds)", cls, buckets=E2E_BUCKETS, registry=r)
        self.preemptions = Counter(PREFIX + "preemptions", "Requests preempted (KV blocks taken back; recomputed "
                                   "later) (vllm:num_preemptions_total)", ["worker"], registry=r)
        self.iteration = Histogram(PREFIX + "iteration_seconds", "Model time of one iteration as the worker "
                                   "measured it (vllm:model_execute_time_milliseconds, in seconds)", ["worker"],
                                   buckets=ITERATION_BUCKETS, registry=r)
        self.decision = Histogram(PREFIX + "decision_seconds", "Time the scheduler took to decide one iteration's "
                                  "plan (the policy's step)", ["worker"], buckets=DECISION_BUCKETS, registry=r)
        self.overhead = Histogram(PREFIX + "overhead_seconds", "Time outside the model per iteration: from when "
                                  "the worker could start the plan to its result applied, less the model time",
                                  ["worker"], buckets=ITERATION_BUCKETS, registry=r)
        self.iterations = Counter(PREFIX + "iterations", "Iterations applied", ["worker"], registry=r)
        if state is not None:
            r.register(_StateCollector(state, self))

    def bind(self, state: "StateSource") -> None:
        """Read the lanes through ``state`` at scrape time (once, after the app is built)."""
        self.registry.register(_StateCollector(state, self))

    def lane(self, worker_id: str) -> "LaneMetrics":
        return LaneMetrics(self, worker_id)

    # -- request life cycle ----------------------------------------------------------------
    def accepted(self, request: Request, emitted_at: Iterable[float] = ()) -> None:
        """An accepted (or recovered: with the times of the tokens it already has) request."""
        self._live[request.request_id] = _Track(request.app_class, request.slo, request.arrival_s,
                                                request.num_prompt_tokens, list(emitted_at))

    def refused_submit(self, app_class: str, code: str) -> None:
        self.refused.labels(self._label(app_class), code).inc()

    def cancelled_request(self, request_id: str) -> None:
        track = self._live.pop(request_id, None)
        if track is not None:
            self.cancelled.labels(track.app_class).inc()

    def stopped_request(self, request: Request, keep: int, now: float) -> None:
        """A request a gateway finished for a stop string, with its first ``keep`` tokens: finished
        (not cancelled), its SLO judged on those tokens by the same rule as every finish."""
        track = self._live.get(request.request_id)
        if track is not None:
            del track.times[keep:]
        self._finished(request, now)

    def forget(self, request_id: str) -> None:
        """A request ended otherwise (its record refused by Redis for good): nothing to count."""
        self._live.pop(request_id, None)

    def _label(self, app_class: str) -> str:
        return app_class if not self.classes or app_class in self.classes else "other"

    def _track(self, request: Request) -> _Track:
        track = self._live.get(request.request_id)
        if track is None:  # not seen at accept (a test's lane, a request routed by hand)
            track = self._live[request.request_id] = _Track(request.app_class, request.slo, request.arrival_s,
                                                            request.num_prompt_tokens)
        return track

    def _finished(self, request: Request, now: float) -> None:
        track = self._live.pop(request.request_id, None) or _Track(request.app_class, request.slo,
                                                                   request.arrival_s, request.num_prompt_tokens)
        reason = request.finish_reason.value if request.finish_reason else "stop"
        record = RequestRecord(request.request_id, track.app_class, track.slo, track.arrival_s, track.prompt_len,
                               token_times=track.times, finish_s=request.finish_s or now, finish_reason=reason,
                               num_preemptions=request.num_preemptions)
        cls = track.app_class
        met = record.attained(self.tbt_tolerance)
        self.finished.labels(cls, reason).inc()
        self.prompt_tokens.labels(cls).inc(track.prompt_len)
        self.e2e.labels(cls).observe(max(0.0, record.finish_s - track.arrival_s))  # type: ignore[operator]
        on_time = sum(record.on_time_flags())
        if on_time:
            self.on_time_tokens.labels(cls).inc(on_time)
        if met:
            self.slo_met.labels(cls).inc()
            self.goodput_tokens.labels(cls).inc(len(track.times))
        window = self._recent.setdefault(cls, deque())
        window.append((now, met))
        while window and window[0][0] < now - ATTAINMENT_WINDOW_S:
            window.popleft()

    def recent_attainment(self, now: float) -> dict[str, tuple[float, int]]:
        """Per class: (attainment, finished) over the last ``ATTAINMENT_WINDOW_S`` seconds."""
        out = {}
        for cls, window in self._recent.items():
            while window and window[0][0] < now - ATTAINMENT_WINDOW_S:
                window.popleft()
            if window:
                out[cls] = (sum(1 for _, met in window if met) / len(window), len(window))
        return out


class LaneMetrics:
    """One lane's view: the worker label bound once, the per-class series shared."""

    def __init__(self, metrics: SchedulerMetrics, worker_id: str) -> None:
        self.m = metrics
        self._decision = metrics.decision.labels(worker_id)
        self._iteration = metrics.iteration.labels(worker_id)
        self._overhead = metrics.overhead.labels(worker_id)
        self._iterations = metrics.iterations.labels(worker_id)
        self._preemptions = metrics.preemptions.labels(worker_id)
        self._by_class: dict[str, tuple[Any, Any, Any]] = {}  # class -> (ttft, tbt, output tokens) children

    def decided(self, seconds: float) -> None:
        self._decision.observe(seconds)

    def applied(self, plan: "BatchPlan", outcome: "StepOutcome", requests: dict[str, Request], now: float) -> None:
        """One applied iteration: its tokens (TTFT, TBT), its finishes (outcomes, SLO) and its
        preemptions. Called before the finished requests are forgotten by the core."""
        self._iterations.inc()
        if plan.preempted_request_ids:
            self._preemptions.inc(len(plan.preempted_request_ids))
        m = self.m
        finished = {r.request_id: r for r in outcome.finished}
        for ev in outcome.tokens:
            r = requests.get(ev.request_id) or finished.get(ev.request_id)
            if r is None:
                continue
            track = m._track(r)
            ttft, tbt, out = self._children(track.app_class)
            if track.times:
                tbt.observe(max(0.0, ev.time_s - track.times[-1]))
            else:
                ttft.observe(max(0.0, ev.time_s - track.arrival_s))
            track.times.append(ev.time_s)
            out.inc()
        for r in outcome.finished:
            m._finished(r, now)

    def timed(self, model_s: float, overhead_s: float) -> None:
        """The worker's model time and the time outside it, for one iteration."""
        self._iteration.observe(max(0.0, model_s))
        self._overhead.observe(max(0.0, overhead_s))

    def _children(self, app_class: str) -> tuple[Any, Any, Any]:
        kids = self._by_class.get(app_class)
        if kids is None:
            m = self.m
            kids = self._by_class[app_class] = (m.ttft.labels(app_class), m.tbt.labels(app_class),
                                                m.output_tokens.labels(app_class))
        return kids


# -- scrape-time gauges ----------------------------------------------------------------------
@dataclass
class LaneView:
    """What a scrape reads of one lane."""

    worker_id: str
    requests: Iterable[Request]
    kv_total: int
    kv_free: int
    up: bool
    overhead_ewma_s: float
    draining: bool = False


@dataclass
class StateSource:
    """How the collector reaches the live state (callables, so it holds no reference to the app's
    types): the lanes, the requests waiting for a worker, and the registered worker count."""

    lanes: Callable[[], list[LaneView]]
    orphans: Callable[[], list[Request]]
    classes: Callable[[], Iterable[str]]
    # hop name -> its recent samples in seconds (ServerInfo's hop latencies: the same windows)
    hops: Callable[[], dict[str, list[float]]] = dict


class _StateCollector(Collector):
    def __init__(self, state: StateSource, metrics: SchedulerMetrics) -> None:
        self.state = state
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        lanes = self.state.lanes()
        classes = list(self.state.classes())
        waiting = dict.fromkeys(classes, 0)
        running = dict.fromkeys(classes, 0)
        for r in self.state.orphans():
            waiting[r.app_class] = waiting.get(r.app_class, 0) + 1
        kv_used = GaugeMetricFamily(PREFIX + "kv_blocks_used", "KV blocks allocated on a worker, by the "
                                    "scheduler's accounting", labels=["worker"])
        kv_free = GaugeMetricFamily(PREFIX + "kv_blocks_free", "KV blocks free on a worker", labels=["worker"])
        kv_total = GaugeMetricFamily(PREFIX + "kv_blocks_total", "KV blocks a worker has", labels=["worker"])
        kv_ratio = GaugeMetricFamily(PREFIX + "kv_cache_usage_ratio", "Fraction of a worker's KV blocks in use, "
                                     "0..1 (vllm:kv_cache_usage_perc)", labels=["worker"])
        up = GaugeMetricFamily(PREFIX + "worker_up", "1 while the worker's lane runs (registered, not failed)",
                               labels=["worker"])
        draining = GaugeMetricFamily(PREFIX + "worker_draining", "1 while the worker drains (accelgen drain, its "
                                     "SIGTERM): routed no new request", labels=["worker"])
        overhead = GaugeMetricFamily(PREFIX + "overhead_ewma_seconds", "The lane's moving average of the time "
                                     "outside the model per iteration, which the policy budgets around",
                                     labels=["worker"])
        for lane in lanes:
            for r in lane.requests:
                status = r.status
                if status == RequestStatus.RUNNING:
                    running[r.app_class] = running.get(r.app_class, 0) + 1
                elif not status.is_done:
                    waiting[r.app_class] = waiting.get(r.app_class, 0) + 1
            used = lane.kv_total - lane.kv_free
            kv_used.add_metric([lane.worker_id], used)
            kv_free.add_metric([lane.worker_id], lane.kv_free)
            kv_total.add_metric([lane.worker_id], lane.kv_total)
            kv_ratio.add_metric([lane.worker_id], used / lane.kv_total if lane.kv_total else 0.0)
            up.add_metric([lane.worker_id], 1.0 if lane.up else 0.0)
            draining.add_metric([lane.worker_id], 1.0 if lane.draining else 0.0)
            overhead.add_metric([lane.worker_id], lane.overhead_ewma_s)
        yield from (kv_used, kv_free, kv_total, kv_ratio, up, draining, overhead)
        w = GaugeMetricFamily(PREFIX + "requests_waiting", "Requests waiting or preempted, per class (queue "
                              "depth; vllm:num_requests_waiting)", labels=["app_class"])
        run = GaugeMetricFamily(PREFIX + "requests_running", "Requests scheduled on a worker, per class "
                                "(vllm:num_requests_running)", labels=["app_class"])
        for cls in sorted(waiting):
            w.add_metric([cls], waiting[cls])
        for cls in sorted(running):
            run.add_metric([cls], running[cls])
        yield from (w, run)
        workers = GaugeMetricFamily(PREFIX + "workers_registered", "Workers registered with this scheduler")
        workers.add_metric([], len(lanes))
        yield workers
        att = GaugeMetricFamily(PREFIX + "slo_attainment_ratio", f"SLO attainment of the requests finished in "
                                f"the last {ATTAINMENT_WINDOW_S:g} s, per class (absent without any)",
                                labels=["app_class"])
        for cls, (ratio, _n) in sorted(self.metrics.recent_attainment(time.time()).items()):
            att.add_metric([cls], ratio)
        yield att
        hop = GaugeMetricFamily(PREFIX + "hop_latency_seconds", "Recent latency of each hop a token takes after "
                                "the model (worker_to_scheduler: result ready -> applied; applied_to_durable: -> in "
                                "Redis; applied_to_gateway: -> sent to the gateway), p50 and p99 of the last samples "
                                "(as GetServerInfo reports them)", labels=["hop", "quantile"])
        for name, values in sorted(self.state.hops().items()):
            if values:
                values = sorted(values)
                for q in (0.5, 0.99):
                    hop.add_metric([name, str(q)], values[min(len(values) - 1, int(q * len(values)))])
        yield hop
