"""Serving metrics with one definition for the simulator and the service.

A token is *on time* when it meets its request's SLO: the first token within TTFT of arrival,
each later one within TBT of the previous one; for a JCT request every token counts as on time
if the whole job finished within its JCT. Goodput is the rate of on-time output tokens,
counted in 1 s windows as in the paper; the request-level variant counts only the tokens of
requests that met their SLO. A request *attains* its SLO when its first token was on time and
at most ``tbt_tolerance`` of its later gaps were late (one late gap after a preemption should
not fail a 500-token answer; a request late throughout should).

The collector is fed events with times the caller supplies; it never reads a clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scheduler_service.core.slo import SLO


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    app_class: str
    slo: SLO
    arrival_s: float
    prompt_len: int
    token_times: list[float] = field(default_factory=list)
    finish_s: float | None = None
    finish_reason: str | None = None
    num_preemptions: int = 0

    def on_time_flags(self) -> list[bool]:
        times = self.token_times
        slo = self.slo
        if not times:
            return []
        if slo.tbt_s is None:
            assert slo.jct_s is not None
            ok = self.finish_s is not None and self.finish_s - self.arrival_s <= slo.jct_s
            return [ok] * len(times)
        assert slo.ttft_s is not None
        flags = [times[0] - self.arrival_s <= slo.ttft_s]
        tbt = slo.tbt_s
        flags.extend(b - a <= tbt for a, b in zip(times, times[1:]))
        return flags

    def attained(self, tbt_tolerance: float) -> bool:
        if self.finish_s is None or self.finish_reason == "abort":
            return False
        flags = self.on_time_flags()
        if not flags:
            return False
        if self.slo.tbt_s is None:
            return flags[0]
        late = sum(1 for f in flags[1:] if not f)
        return flags[0] and late <= tbt_tolerance * max(1, len(flags) - 1)


@dataclass(frozen=True, slots=True)
class IterationSample:
    start_s: float
    duration_s: float
    forward_tokens: int
    num_requests: int
    kv_used_blocks: int
    kv_total_blocks: int
    decision_s: float
    predicted_s: float = 0.0


class MetricsCollector:
    def __init__(self, s_pf: int, tbt_tolerance: float = 0.05, window_s: float = 1.0) -> None:
        self.s_pf = s_pf
        self.tbt_tolerance = tbt_tolerance
        self.window_s = window_s
        self.requests: dict[str, RequestRecord] = {}
        self.iterations: list[IterationSample] = []

    # -- events -------------------------------------------------------------------------
    def on_arrival(self, request_id: str, app_class: str, slo: SLO, arrival_s: float, prompt_len: int) -> None:
        self.requests[request_id] = RequestRecord(request_id, app_class, slo, arrival_s, prompt_len)

    def on_token(self, request_id: str, time_s: float) -> None:
        self.requests[request_id].token_times.append(time_s)

    def on_finish(self, request_id: str, time_s: float, reason: str, num_preemptions: int = 0) -> None:
        record = self.requests[request_id]
        record.finish_s = time_s
        record.finish_reason = reason
        record.num_preemptions = num_preemptions

    def on_iteration(self, sample: IterationSample) -> None:
        self.iterations.append(sample)

    # -- summary ------------------------------------------------------------------------
    def summary(self, horizon_s: float | None = None) -> dict[str, Any]:
        """All metrics over ``[0, horizon_s]`` (default: until the last token)."""
        records = list(self.requests.values())
        all_times = [t for r in records for t in r.token_times]
        end = horizon_s if horizon_s is not None else (max(all_times) if all_times else 0.0)
        end = max(end, 1e-9)
        n_windows = max(1, math.ceil(end / self.window_s))
        good_per_window = np.zeros(n_windows)
        tokens = good = req_good_tokens = 0
        ttft, tbt, jct = [], [], []
        per_class: dict[str, list[int]] = {}
        for r in records:
            flags = r.on_time_flags()
            attained = r.attained(self.tbt_tolerance)
            counts = per_class.setdefault(r.app_class, [0, 0])
            counts[0] += 1
            counts[1] += int(attained)
            in_horizon = sum(1 for t in r.token_times if t <= end)
            tokens += in_horizon
            if attained:
                req_good_tokens += in_horizon
            for t, ok in zip(r.token_times, flags):
                if ok and t <= end:
                    good += 1
                    good_per_window[min(n_windows - 1, int(t / self.window_s))] += 1
            if r.token_times:
                ttft.append(r.token_times[0] - r.arrival_s)
                tbt.extend(b - a for a, b in zip(r.token_times, r.token_times[1:]))
            if r.finish_s is not None:
                jct.append(r.finish_s - r.arrival_s)
        n_req = len(records)
        attained_total = sum(c[1] for c in per_class.values())
        return {
            "num_requests": n_req,
            "num_finished": sum(1 for r in records if r.finish_s is not None),
            "duration_s": end,
            "output_tokens": tokens,
            "throughput_tok_s": tokens / end,
            "goodput_tok_s": float(good_per_window.mean() / self.window_s),
            "request_goodput_tok_s": req_good_tokens / end,
            "slo_attainment": attained_total / n_req if n_req else 0.0,
            "slo_attainment_by_class": {k: c[1] / c[0] for k, c in sorted(per_class.items())},
            **_percentiles("ttft_ms", ttft, 1000.0),
            **_percentiles("tbt_ms", tbt, 1000.0),
            **_percentiles("jct_s", jct, 1.0),
            "mean_jct_s": float(np.mean(jct)) if jct else 0.0,
            "preemptions": sum(r.num_preemptions for r in records),
            **self._iteration_metrics(),
        }

    def _iteration_metrics(self) -> dict[str, Any]:
        its = self.iterations
        if not its:
            return {"iterations": 0, "compute_util": 0.0, "kv_util": 0.0, "kv_unallocated": 1.0,
                    "sched_ms_p50": 0.0, "sched_ms_p99": 0.0}
        dur = np.array([i.duration_s for i in its])
        weight = dur / dur.sum() if dur.sum() > 0 else np.full(len(its), 1.0 / len(its))
        compute = np.minimum(1.0, np.array([i.forward_tokens for i in its]) / self.s_pf)
        kv = np.array([i.kv_used_blocks / i.kv_total_blocks for i in its])
        decision_ms = np.array([i.decision_s for i in its]) * 1000.0
        kv_util = float((kv * weight).sum())
        return {
            "iterations": len(its),
            "compute_util": float((compute * weight).sum()),
            "kv_util": kv_util,
            "kv_unallocated": 1.0 - kv_util,
            "sched_ms_p50": float(np.percentile(decision_ms, 50)),
            "sched_ms_p99": float(np.percentile(decision_ms, 99)),
            "mean_forward_tokens": float(np.mean([i.forward_tokens for i in its])),
        }


def _percentiles(name: str, values: list[float], scale: float) -> dict[str, float]:
    if not values:
        return {f"p50_{name}": 0.0, f"p90_{name}": 0.0, f"p99_{name}": 0.0}
    arr = np.asarray(values) * scale
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {f"p50_{name}": float(p50), f"p90_{name}": float(p90), f"p99_{name}": float(p99)}
