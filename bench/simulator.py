"""Trace-driven simulator: the real scheduling core under a virtual clock.

The simulator owns time. Each loop it admits the arrivals that are due, asks the *same*
``SchedulerCore`` and policy the service uses for a plan, prices the plan with the device
profile's cost model (the exact batch: chunk sizes, decodes, context lengths), advances the
clock by that time, and reports deterministic tokens back — EOS at each request's true output
length, which only this executor (and the oracle policy) knows.

With ``workers > 1`` it runs N lanes as the service does: each lane is one worker with its own
core, policy, KV pool and executor, and a router (``accelgen.core.routing``) sends
each arrival to a lane at its arrival time. The loop is discrete-event: it always advances the
earliest event — an arrival, or a lane whose iteration ends (arrivals first at equal times).
One worker gives exactly the single-lane loop this replaced.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from bench.workloads import WorkloadRequest
from accelgen.core.admission import AdmissionRefused
from accelgen.core.metrics import IterationSample, MetricsCollector
from accelgen.core.plan import BatchPlan, IterationResult
from accelgen.core.profile import DeviceProfile
from accelgen.core.request import Request, SamplingParams
from accelgen.core.routing import Router, make_router
from accelgen.core.scheduler import CoreConfig, SchedulerCore
from accelgen.core.policies.registry import make_policy
from accelgen.core.slo import SLOCatalog

EOS_TOKEN_ID = 2
_PROMPT_TOKEN = 7


@dataclass(frozen=True)
class SimConfig:
    policy: str
    policy_config: Any = None
    catalog: SLOCatalog = field(default_factory=SLOCatalog)
    core: CoreConfig = field(default_factory=CoreConfig)
    time_noise: float = 0.0
    """Log-normal sigma of real/predicted iteration time (0 = the cost model is exact)."""
    seed: int = 0
    drain_limit_s: float | None = None
    """Stop this long after the last arrival even if requests remain (None = run to the end)."""
    tbt_tolerance: float = 0.05
    workers: int = 1
    """Simulated workers (lanes), each with its own core, policy, KV pool and executor."""
    routing: str = "least-work"
    """How an arrival picks its lane: a name of ``accelgen.core.routing.make_router``."""

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")


@dataclass
class SimResult:
    policy: str
    summary: dict[str, Any]
    metrics: MetricsCollector
    wall_s: float
    cores: list[SchedulerCore] = field(default_factory=list)
    """Each lane's core as the run left it (index = lane)."""


def make_request(item: WorkloadRequest, catalog: SLOCatalog, max_model_len: int) -> Request:
    """A core request for a workload item. ``max_tokens`` is the context left: the client
    does not know the output length; the executor ends the request with EOS."""
    return Request(
        request_id=item.request_id,
        prompt_token_ids=[_PROMPT_TOKEN] * item.prompt_len,
        sampling=SamplingParams(max_tokens=max(1, max_model_len - item.prompt_len)),
        slo=catalog.get(item.app_class).slo,
        app_class=item.app_class,
        arrival_s=item.arrival_s,
        eos_token_id=EOS_TOKEN_ID,
    )


class CostModelExecutor:
    """Runs a plan 'instantly' and says how long the device would have taken."""

    def __init__(self, profile: DeviceProfile, output_lengths: Mapping[str, int],
                 prompt_lengths: Mapping[str, int], noise: float = 0.0, seed: int = 0) -> None:
        self.profile = profile
        self.output_lengths = output_lengths
        self.prompt_lengths = prompt_lengths
        self.noise = noise
        self._rng = random.Random(seed)

    def execute(self, plan: BatchPlan) -> IterationResult:
        elapsed = self.profile.batch_time_s((c.num_new_tokens, c.num_computed_tokens) for c in plan.chunks)
        if self.noise > 0:
            elapsed *= math.exp(self.noise * self._rng.gauss(0.0, 1.0) - 0.5 * self.noise**2)
        sampled = {}
        for c in plan.chunks:
            if c.samples:
                index = c.num_computed_tokens + c.num_new_tokens - self.prompt_lengths[c.request_id]
                last = self.output_lengths[c.request_id] - 1
                sampled[c.request_id] = EOS_TOKEN_ID if index >= last else 100 + (index % 1000)
        return IterationResult(iteration=plan.iteration, sampled_token_ids=sampled, elapsed_s=elapsed)


@dataclass(eq=False)
class _Lane:
    """One simulated worker: its core, its executor, and the iteration it is running."""

    index: int
    core: SchedulerCore
    executor: CostModelExecutor
    wake_s: float = 0.0
    """When it next plans: the end of its running iteration, an arrival it got while idle, or
    ``inf`` (idle with nothing routed to it, or past the drain limit)."""
    plan: BatchPlan | None = None
    result: IterationResult | None = None
    sample: IterationSample | None = None
    stopped: bool = False  # reached the drain limit


def _make_lane(index: int, profile: DeviceProfile, config: SimConfig, output_lengths: Mapping[str, int],
               prompt_lengths: Mapping[str, int]) -> _Lane:
    policy = make_policy(config.policy, profile, config.catalog, config=config.policy_config,
                         output_lengths=output_lengths)
    core = SchedulerCore(policy, profile, config=config.core)
    executor = CostModelExecutor(profile, output_lengths, prompt_lengths, config.time_noise, config.seed + index)
    return _Lane(index, core, executor)


def _submit(lane: _Lane, request: Request, item: WorkloadRequest, metrics: MetricsCollector) -> None:
    """The one place a request enters a lane (at its arrival time), behind the policy's
    admission control: a refused request is recorded as such and counts as a miss."""
    metrics.on_arrival(item.request_id, item.app_class, request.slo, item.arrival_s, item.prompt_len)
    try:
        lane.core.submit(request, item.arrival_s)
    except AdmissionRefused:
        metrics.on_refused(item.request_id, item.arrival_s)
        return
    if lane.plan is None:  # an idle lane plans as soon as work reaches it
        lane.wake_s = min(lane.wake_s, item.arrival_s)


def _route(item: WorkloadRequest, lanes: Sequence[_Lane], router: Router, config: SimConfig,
           max_model_len: int, metrics: MetricsCollector) -> None:
    request = make_request(item, config.catalog, max_model_len)
    lane = lanes[router.pick(request, [lane.core for lane in lanes])]
    _submit(lane, request, item, metrics)


def _start_iteration(lane: _Lane, now: float) -> None:
    """Plan and price the lane's next iteration; an empty plan leaves the lane idle."""
    core = lane.core
    t0 = time.perf_counter()
    plan = core.step(now)
    decision_s = time.perf_counter() - t0
    if plan.is_empty:
        lane.wake_s = math.inf
        return
    result = lane.executor.execute(plan)
    lane.plan, lane.result = plan, result
    lane.sample = IterationSample(now, result.elapsed_s, plan.num_tokens, len(plan.chunks), core.kv.num_used_blocks,
                                  core.kv.total_usable_blocks, decision_s, plan.predicted_time_s)
    lane.wake_s = now + result.elapsed_s


def _finish_iteration(lane: _Lane, now: float, metrics: MetricsCollector) -> None:
    """Apply the lane's running iteration, which ends at ``now``, and record what it produced."""
    assert lane.plan is not None and lane.result is not None and lane.sample is not None
    outcome = lane.core.complete(lane.plan, lane.result, now)
    metrics.on_iteration(lane.sample)
    for ev in outcome.tokens:
        metrics.on_token(ev.request_id, ev.time_s)
    for req in outcome.finished:
        metrics.on_finish(req.request_id, now, req.finish_reason.value if req.finish_reason else "", req.num_preemptions)
    lane.plan = lane.result = lane.sample = None


def _check_not_stuck(lanes: Sequence[_Lane], policy: str) -> None:
    for lane in lanes:
        if not lane.stopped and lane.core.has_work():
            where = f" on lane {lane.index}" if len(lanes) > 1 else ""
            raise RuntimeError(f"policy {policy!r} scheduled nothing with work left{where} (stuck)")


def simulate(
    workload: Sequence[WorkloadRequest],
    profile: DeviceProfile,
    config: SimConfig,
    progress: Callable[[float], None] | None = None,
) -> SimResult:
    """Run one policy on ``config.workers`` lanes over a workload; returns the metrics summary."""
    started = time.perf_counter()
    output_lengths = {w.request_id: w.output_len for w in workload}
    prompt_lengths = {w.request_id: w.prompt_len for w in workload}
    lanes = [_make_lane(k, profile, config, output_lengths, prompt_lengths) for k in range(config.workers)]
    router = make_router(config.routing, config.catalog, profile)
    metrics = MetricsCollector(profile.s_pf, tbt_tolerance=config.tbt_tolerance)
    items = sorted(workload, key=lambda w: (w.arrival_s, w.request_id))
    last_arrival = items[-1].arrival_s if items else 0.0
    stop_at = math.inf if config.drain_limit_s is None else last_arrival + config.drain_limit_s
    i, n = 0, len(items)
    while True:
        lane = min(lanes, key=lambda lane: lane.wake_s)  # ties: the lowest index
        if i < n and items[i].arrival_s <= lane.wake_s:  # arrivals first at equal times
            _route(items[i], lanes, router, config, profile.max_model_len, metrics)
            i += 1
            continue
        now = lane.wake_s
        if now == math.inf:
            break
        if lane.plan is not None:
            _finish_iteration(lane, now, metrics)
            if progress is not None:
                progress(now)
        if now > stop_at:
            lane.wake_s, lane.stopped = math.inf, True
            continue
        _start_iteration(lane, now)
    _check_not_stuck(lanes, config.policy)
    for lane in lanes:  # preemption counts of unfinished requests too
        for req in lane.core.requests.values():
            metrics.requests[req.request_id].num_preemptions = req.num_preemptions
    summary = metrics.summary()
    summary["policy"] = config.policy
    return SimResult(config.policy, summary, metrics, time.perf_counter() - started, [lane.core for lane in lanes])
