"""Trace-driven simulator: the real scheduling core under a virtual clock.

The simulator owns time. Each loop it admits the arrivals that are due, asks the *same*
``SchedulerCore`` and policy the service uses for a plan, prices the plan with the device
profile's cost model (the exact batch: chunk sizes, decodes, context lengths), advances the
clock by that time, and reports deterministic tokens back — EOS at each request's true output
length, which only this executor (and the oracle policy) knows.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from bench.workloads import WorkloadRequest
from scheduler_service.core.metrics import IterationSample, MetricsCollector
from scheduler_service.core.plan import BatchPlan, IterationResult
from scheduler_service.core.profile import DeviceProfile
from scheduler_service.core.request import Request, SamplingParams
from scheduler_service.core.scheduler import CoreConfig, SchedulerCore
from scheduler_service.core.policies.registry import make_policy
from scheduler_service.core.slo import SLOCatalog

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


@dataclass
class SimResult:
    policy: str
    summary: dict[str, Any]
    metrics: MetricsCollector
    wall_s: float


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


def simulate(
    workload: Sequence[WorkloadRequest],
    profile: DeviceProfile,
    config: SimConfig,
    progress: Callable[[float], None] | None = None,
) -> SimResult:
    """Run one policy over a workload; returns the metrics summary."""
    started = time.perf_counter()
    output_lengths = {w.request_id: w.output_len for w in workload}
    prompt_lengths = {w.request_id: w.prompt_len for w in workload}
    policy = make_policy(config.policy, profile, config.catalog, config=config.policy_config,
                         output_lengths=output_lengths)
    core = SchedulerCore(policy, profile, config=config.core)
    executor = CostModelExecutor(profile, output_lengths, prompt_lengths, config.time_noise, config.seed)
    metrics = MetricsCollector(profile.s_pf, tbt_tolerance=config.tbt_tolerance)
    items = sorted(workload, key=lambda w: (w.arrival_s, w.request_id))
    last_arrival = items[-1].arrival_s if items else 0.0
    stop_at = math.inf if config.drain_limit_s is None else last_arrival + config.drain_limit_s
    now, i, n = 0.0, 0, len(items)
    kv_total = core.kv.total_usable_blocks
    while now <= stop_at:
        while i < n and items[i].arrival_s <= now:
            item = items[i]
            core.add_request(make_request(item, config.catalog, profile.max_model_len))
            metrics.on_arrival(item.request_id, item.app_class, core.requests[item.request_id].slo,
                               item.arrival_s, item.prompt_len)
            i += 1
        t0 = time.perf_counter()
        plan = core.step(now)
        decision_s = time.perf_counter() - t0
        if plan.is_empty:
            if i >= n:
                if core.has_work():
                    raise RuntimeError(f"policy {config.policy!r} scheduled nothing with work left (stuck)")
                break
            now = max(now, items[i].arrival_s)
            continue
        result = executor.execute(plan)
        kv_used = core.kv.num_used_blocks
        start = now
        now += result.elapsed_s
        outcome = core.complete(plan, result, now)
        metrics.on_iteration(IterationSample(start, result.elapsed_s, plan.num_tokens, len(plan.chunks),
                                             kv_used, kv_total, decision_s, plan.predicted_time_s))
        for ev in outcome.tokens:
            metrics.on_token(ev.request_id, ev.time_s)
        for req in outcome.finished:
            metrics.on_finish(req.request_id, now, req.finish_reason.value if req.finish_reason else "", req.num_preemptions)
        if progress is not None:
            progress(now)
    for req in core.requests.values():  # preemption counts of unfinished requests too
        rec = metrics.requests[req.request_id]
        rec.num_preemptions = req.num_preemptions
    summary = metrics.summary()
    summary["policy"] = config.policy
    return SimResult(config.policy, summary, metrics, time.perf_counter() - started)
