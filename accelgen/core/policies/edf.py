"""Earliest deadline first: the classic real-time order, applied per token.

Each request's deadline is when its next token is due (arrival + TTFT for the first token,
previous token + TBT afterwards, arrival + JCT for JCT-only requests). Running and waiting
requests are served in deadline order within one static budget — the same budget as
Sarathi-Serve, so the comparison isolates ordering. On a KV shortage the running request with
the latest deadline is preempted.

Admission keeps the same KV growth reserve as AccelGen (``kv_reserve``): without it EDF admits
prompts into the last free blocks and then thrashes, preempting thousands of times an hour,
which made it a strawman rather than a baseline.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

from accelgen.core.batch_builder import BatchBuilder
from accelgen.core.budget import BudgetConfig
from accelgen.core.kv_reserve import admission_reserve_blocks, growth_blocks, headroom_final_tokens
from accelgen.core.policies.base import Policy
from accelgen.core.policies.sarathi import static_budget_for_tightest
from accelgen.core.profile import DeviceProfile
from accelgen.core.request import Request, RequestStatus
from accelgen.core.slo import SLOCatalog


@dataclass(frozen=True, slots=True)
class EDFConfig:
    token_budget: int | None = None
    budget: BudgetConfig = BudgetConfig()
    kv_headroom_tokens: int = 128
    """Expected output tokens reserved per request at admission (0: no reserve), as AccelGen's."""


class EDFPolicy(Policy):
    name = "edf"

    def __init__(self, profile: DeviceProfile, catalog: SLOCatalog, config: EDFConfig | None = None) -> None:
        super().__init__(profile, catalog)
        self.config = config or EDFConfig()
        self.token_budget = self.config.token_budget or static_budget_for_tightest(profile, catalog, self.config.budget)

    def queue_key(self, request: Request, preempted: bool) -> Any:
        # The deadline of a waiting request does not move while it waits, so it is a valid static key.
        return request.next_token_deadline_s()

    def fill(self, batch: BatchBuilder, now: float) -> None:
        batch.set_budget(self.token_budget)
        core = self.bound
        running = sorted(core.running, key=Request.next_token_deadline_s)
        slots = core.config.max_num_seqs - len(core.running)
        waiting = core.waiting.head(max(0, slots) + 1)
        ordered = heapq.merge(
            ((r.next_token_deadline_s(), 0, i, r) for i, r in enumerate(running)),
            ((r.next_token_deadline_s(), 1, i, r) for i, r in enumerate(waiting)),
        )
        admitting = True
        reserve = self._growth_reserve()
        for _, _, _, request in ordered:
            if batch.tokens_left <= 0:
                break
            if request.status is RequestStatus.RUNNING:
                self.schedule_running_or_preempt(batch, request, self._latest_deadline_victim)
            elif admitting and request.request_id in core.waiting:
                # A waiting request that does not fit stops admission (no overtaking on KV),
                # but running requests later in deadline order still run.
                extra = 0
                if reserve is not None:
                    extra = admission_reserve_blocks(request, batch.kv, batch.tokens_left, self._expected_final, reserve)
                if batch.schedule(request, reserve_blocks=extra) == 0:
                    if batch.last_failure in ("kv", "seqs"):
                        admitting = False
                elif reserve is not None:
                    reserve += growth_blocks(batch.kv, (request,), self._expected_final)

    def _expected_final(self, request: Request) -> int:
        return headroom_final_tokens(request, self.config.kv_headroom_tokens, self.profile.max_model_len)

    def _growth_reserve(self) -> int | None:
        if self.config.kv_headroom_tokens <= 0:
            return None
        return growth_blocks(self.bound.kv, self.bound.running, self._expected_final)

    def _latest_deadline_victim(self, batch: BatchBuilder, needy: Request) -> Request | None:
        running = self.bound.running
        if not running:
            return None
        return max(running, key=lambda r: (r.next_token_deadline_s(), r.arrival_s))
