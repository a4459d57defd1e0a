"""SLO-aware admission: refuse at submit a request whose first token cannot be on time.

Under overload a scheduler that knows SLOs should decide whom it can still serve. Accepting a
request that will miss anyway costs twice: it misses, and the compute and KV it takes push
requests behind it past their deadlines too. So at submit we estimate when the request's first
token would come, from the prefill work the policy will run before it (the waiting requests its
queue order puts ahead, and the rest of the running prompts) and the lane's measured prefill
rate, and refuse it if that is past its first-token deadline; the refusal says when a retry
could succeed. The rule is policy-agnostic (it reads the policy's own queue order), so the same
admission can be offered to the vLLM baseline and a comparison isolates the scheduler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from accelgen.core.plan import BatchPlan
from accelgen.core.request import Request, RequestStatus

if TYPE_CHECKING:
    from accelgen.core.scheduler import SchedulerCore


class AdmissionRefused(Exception):
    """A request refused at submit because its SLO cannot be met; ``retry_after_s`` is when the
    backlog ahead of it is expected to have drained enough (a hint, not a promise)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    slack: float = 1.0
    """Refuse when the predicted wait exceeds ``slack`` x the time left to the first-token
    deadline (above 1: more lenient)."""
    horizon_s: float = 5.0
    """Time constant of the measured prefill rate: iterations this long ago weigh 1/e."""

    def __post_init__(self) -> None:
        if self.slack <= 0:
            raise ValueError("admission slack must be > 0")
        if self.horizon_s <= 0:
            raise ValueError("admission horizon_s must be > 0")


class AdmissionControl:
    """Per-lane admission: a prefill-rate estimate and the check made at submit."""

    def __init__(self, initial_rate_tok_s: float, config: AdmissionConfig | None = None) -> None:
        if initial_rate_tok_s <= 0:
            raise ValueError("initial prefill rate must be > 0")
        self.config = config or AdmissionConfig()
        # Prefill tokens and seconds, both decayed with time, so the rate is a time average
        # (per-iteration averaging would let a run of short decode-only iterations, each with
        # no prefill, drive it to zero). Seeded with one second at the initial rate.
        self._tokens = initial_rate_tok_s
        self._seconds = 1.0
        self.refused = 0

    @property
    def rate_tok_s(self) -> float:
        return self._tokens / self._seconds

    def observe(self, plan: BatchPlan, elapsed_s: float, backlogged: bool) -> None:
        """Learn the prefill rate from iterations that had waiting work (an idle lane's rate
        says nothing about its capacity)."""
        if not backlogged or elapsed_s <= 0:
            return
        prefill = sum(c.num_new_tokens for c in plan.chunks if not c.is_decode)
        keep = math.exp(-elapsed_s / self.config.horizon_s)
        self._tokens = self._tokens * keep + prefill
        self._seconds = self._seconds * keep + elapsed_s

    def predicted_wait_s(self, core: "SchedulerCore", request: Request) -> float:
        key = core.policy.queue_key(request, False)
        ahead = 0
        for r in core.running:
            if r.status is RequestStatus.RUNNING and r.is_prefilling:
                ahead += r.num_uncomputed_tokens
        for r in core.waiting:
            if core.waiting.key_of(r.request_id) > key:
                break
            ahead += r.num_uncomputed_tokens
        return (ahead + request.num_uncomputed_tokens) / self.rate_tok_s

    def check(self, core: "SchedulerCore", request: Request, now: float) -> None:
        """Raise ``AdmissionRefused`` if the request's first token would miss its deadline."""
        slo = request.slo
        budget = slo.ttft_s if slo.ttft_s is not None else slo.jct_s
        assert budget is not None  # SLO guarantees one of them
        left = request.arrival_s + budget - now
        wait = self.predicted_wait_s(core, request)
        if wait > self.config.slack * left:
            self.refused += 1
            retry = max(0.0, wait - budget)
            raise AdmissionRefused(
                f"the SLO of class {request.app_class!r} cannot be met now: its first token is due in "
                f"{max(0.0, left) * 1000:.0f} ms but about {wait * 1000:.0f} ms of prefill work is ahead of it; "
                f"retry in {retry:.1f} s or ask for a looser SLO", retry)
