"""Serving metrics with one definition for the simulator and the service.

A token is *on time* when it meets its own bound -- the first token within TTFT of arrival,
each later one within TBT of the previous one -- *and* the request's first token was on time.
The second condition is what makes goodput mean something under overload: a stream whose first
token came 48 s late has already failed its user, and crediting its later, evenly spaced tokens
made token goodput track throughput at 23% attainment. For a JCT request every token counts as
on time iff the whole job finished within its JCT.

Goodput (``goodput_tok_s``) is the rate of on-time output tokens, counted in 1 s windows as in
the paper; ``request_goodput_tok_s`` counts only the tokens of requests that attained their
SLO, and ``request_goodput_rps`` the attained requests per second, as ``vllm bench serve
--goodput`` does. A request *attains* its SLO when its first token was on time and at most
``tbt_tolerance`` of its later gaps were late (one late gap after a preemption should not fail a
500-token answer; a request late throughout should). A request the scheduler refused at submit
(SLO-aware admission) is recorded with ``on_refused``: it stays in every denominator and never
attains, so refusing work cannot raise attainment.

Every latency percentile also comes per application class: classes have SLOs an order of
magnitude apart, and one pooled p99 TBT hides a strict class missing its bound behind a lax one.

The collector is fed events with times the caller supplies; it never reads a clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from accelgen.core.slo import SLO

#: ``finish_reason`` of a request the scheduler refused at submit (see ``MetricsCollector.on_refused``).
REFUSED = "refused"
#: ``finish_reason`` of a request the client cancelled (``FinishReason.CANCELLED``).
ABORTED = "abort"


@dataclass(slots=True)
class RequestRecord:
    """What one request was promised and when each of its output tokens arrived."""

    request_id: str
    app_class: str
    slo: SLO
    arrival_s: float
    prompt_len: int
    token_times: list[float] = field(default_factory=list)
    finish_s: float | None = None
    finish_reason: str | None = None
    num_preemptions: int = 0

    @property
    def refused(self) -> bool:
        return self.finish_reason == REFUSED

    def own_bound_flags(self) -> list[bool]:
        """Per token, whether it met its own bound alone (TTFT for the first, TBT for the rest).

        This is the per-gap view attainment's tolerance counts; goodput uses ``on_time_flags``.
        """
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

    def on_time_flags(self) -> list[bool]:
        """Per token, whether it counts towards goodput: its own bound met and the stream started
        on time (a late first token forfeits the whole stream, see the module docstring)."""
        flags = self.own_bound_flags()
        if flags and not flags[0]:
            return [False] * len(flags)
        return flags

    def attained(self, tbt_tolerance: float) -> bool:
        """Whether the request met its SLO: finished (not cancelled, not refused), first token on
        time, and at most ``tbt_tolerance`` of its gaps late (JCT: finished within the JCT)."""
        if self.finish_s is None or self.finish_reason in (ABORTED, REFUSED):
            return False
        flags = self.own_bound_flags()
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
    """Accumulates request and iteration events; ``summary`` turns them into the report."""

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

    def on_refused(self, request_id: str, time_s: float) -> None:
        """The scheduler refused the request at submit (after ``on_arrival``).

        It ends with reason ``"refused"`` and no tokens, stays in ``num_requests`` and every
        attainment denominator and never attains: a policy must not gain attainment by refusing.
        """
        record = self.requests[request_id]
        if record.token_times:
            raise ValueError(f"request {request_id!r} already streamed {len(record.token_times)} tokens; "
                             "a refusal happens at submit, before any token")
        record.finish_s = time_s
        record.finish_reason = REFUSED

    def on_iteration(self, sample: IterationSample) -> None:
        self.iterations.append(sample)

    # -- summary ------------------------------------------------------------------------
    def summary(self, horizon_s: float | None = None) -> dict[str, Any]:
        """All metrics over ``[0, horizon_s]`` (default: until the last token).

        Rates divide by that duration; only tokens at or before its end count, and an attained
        request counts towards ``request_goodput_rps`` only if its last token came by then.
        Per-class dicts have one entry per class that had a request, sorted by class name.
        """
        records = list(self.requests.values())
        all_times = [t for r in records for t in r.token_times]
        end = horizon_s if horizon_s is not None else (max(all_times) if all_times else 0.0)
        end = max(end, 1e-9)
        n_windows = max(1, math.ceil(end / self.window_s))
        good_per_window = np.zeros(n_windows)
        tokens = good = req_good_tokens = 0
        ttft: list[float] = []
        tbt: list[float] = []
        jct: list[float] = []
        classes: dict[str, _ClassStats] = {}
        for r in records:
            flags = r.on_time_flags()
            attained = r.attained(self.tbt_tolerance)
            cls = classes.setdefault(r.app_class, _ClassStats())
            cls.requests += 1
            cls.attained += int(attained)
            cls.refused += int(r.refused)
            in_horizon = sum(1 for t in r.token_times if t <= end)
            tokens += in_horizon
            if attained:
                req_good_tokens += in_horizon
                if r.token_times[-1] <= end:
                    cls.attained_in_horizon += 1
            for t, ok in zip(r.token_times, flags):
                if ok and t <= end:
                    good += 1
                    good_per_window[min(n_windows - 1, int(t / self.window_s))] += 1
            if r.token_times:
                first = r.token_times[0] - r.arrival_s
                gaps = [b - a for a, b in zip(r.token_times, r.token_times[1:])]
                ttft.append(first)
                tbt.extend(gaps)
                cls.ttft.append(first)
                cls.tbt.extend(gaps)
            if r.finish_s is not None and not r.refused:  # a refusal is no job: no JCT sample
                jct.append(r.finish_s - r.arrival_s)
        n_req = len(records)
        by_class = sorted(classes.items())
        attained_total = sum(c.attained for c in classes.values())
        return {
            "num_requests": n_req,
            "num_finished": sum(1 for r in records if r.finish_s is not None),
            "num_refused": sum(c.refused for c in classes.values()),
            "duration_s": end,
            "output_tokens": tokens,
            "throughput_tok_s": tokens / end,
            "goodput_tok_s": float(good_per_window.mean() / self.window_s),
            "request_goodput_tok_s": req_good_tokens / end,
            "request_goodput_rps": sum(c.attained_in_horizon for c in classes.values()) / end,
            "slo_attainment": attained_total / n_req if n_req else 0.0,
            "slo_attainment_by_class": {k: c.attained / c.requests for k, c in by_class},
            "num_requests_by_class": {k: c.requests for k, c in by_class},
            "refused_by_class": {k: c.refused for k, c in by_class},
            "request_goodput_rps_by_class": {k: c.attained_in_horizon / end for k, c in by_class},
            "p50_ttft_ms_by_class": {k: _percentile(c.ttft, 50, 1000.0) for k, c in by_class},
            "p99_ttft_ms_by_class": {k: _percentile(c.ttft, 99, 1000.0) for k, c in by_class},
            "p99_tbt_ms_by_class": {k: _percentile(c.tbt, 99, 1000.0) for k, c in by_class},
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
                    "sched_ms_p50": 0.0, "sched_ms_p99": 0.0, "mean_forward_tokens": 0.0}
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


@dataclass(slots=True)
class _ClassStats:
    """One application class's tallies while ``summary`` walks the records."""

    requests: int = 0
    attained: int = 0
    attained_in_horizon: int = 0  # attained and last token by the summary's end
    refused: int = 0
    ttft: list[float] = field(default_factory=list)
    tbt: list[float] = field(default_factory=list)


def _percentile(values: list[float], q: float, scale: float) -> float:
    """numpy's default (linear) percentile of ``values`` times ``scale``; 0.0 without samples,
    as ``_percentiles`` reports an empty distribution."""
    return float(np.percentile(np.asarray(values) * scale, q)) if values else 0.0


def _percentiles(name: str, values: list[float], scale: float) -> dict[str, float]:
    if not values:
        return {f"p50_{name}": 0.0, f"p90_{name}": 0.0, f"p99_{name}": 0.0}
    arr = np.asarray(values) * scale
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {f"p50_{name}": float(p50), f"p90_{name}": float(p90), f"p99_{name}": float(p99)}
