"""Per-iteration bookkeeping shared by every policy (the template the policies fill in).

A policy decides *which* requests run and in what order; the builder does the rest once, for
all of them: admission from the waiting queue, KV block allocation, the token budget, the
running price of the batch under the cost model, and preemption by recompute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from accelgen.core.plan import BatchPlan, ScheduledChunk
from accelgen.core.profile import BatchCost
from accelgen.core.request import Request, RequestStatus

if TYPE_CHECKING:
    from accelgen.core.scheduler import SchedulerCore


@dataclass(slots=True)
class _Pending:
    request: Request
    num_computed: int
    num_new: int
    new_blocks: list[int]
    is_new: bool


class BatchBuilder:
    """Accumulates one iteration's batch. Create one per ``SchedulerCore.step``."""

    def __init__(self, core: "SchedulerCore", now: float) -> None:
        self.core = core
        self.now = now
        self.kv = core.kv
        self.cost: BatchCost = core.profile.batch_cost()
        self.token_budget = 0
        self.tokens_used = 0
        self.slo_min_s: float | None = None
        self.time_limit_s: float | None = None
        self._pending: dict[str, _Pending] = {}
        self.preempted: list[Request] = []
        self.last_failure: str = ""  # why the last ``schedule`` returned 0: "kv", "budget", ...

    # -- budget -------------------------------------------------------------------------
    def set_budget(self, tokens: int, slo_min_s: float | None = None, time_limit_s: float | None = None) -> None:
        """Fix this iteration's token budget (and optionally a bound on its predicted time).

        Never above the worker's own per-plan limit, whatever the policy asks for.
        """
        cap = self.core.config.max_num_batched_tokens
        self.token_budget = tokens if cap is None else min(tokens, cap)
        self.slo_min_s = slo_min_s
        self.time_limit_s = time_limit_s

    @property
    def tokens_left(self) -> int:
        return max(0, self.token_budget - self.tokens_used)

    @property
    def num_scheduled(self) -> int:
        return len(self._pending)

    def is_scheduled(self, request_id: str) -> bool:
        return request_id in self._pending

    def can_admit_more(self) -> bool:
        return len(self.core.running) < self.core.config.max_num_seqs

    # -- scheduling ---------------------------------------------------------------------
    def schedule(
        self,
        request: Request,
        max_new_tokens: int | None = None,
        reserve_blocks: int = 0,
        respect_time_limit: bool = True,
    ) -> int:
        """Put the request's next tokens in the batch; return how many (0 = it did not fit).

        A prefill is chunked to what is left of the budget (dynamic chunking), and, when a time
        limit is set, to what keeps the batch's predicted time within it. A waiting request is
        admitted only if its first chunk's blocks fit with ``reserve_blocks`` to spare.
        """
        rid = request.request_id
        if rid in self._pending or request.status.is_done:
            return self._fail("done")
        if request.num_pending_outputs and not self._can_run_ahead(request):
            return self._fail("pending")
        if request.status is RequestStatus.RUNNING and max_new_tokens is None:
            k = request.num_computed_tokens
            if k > 0 and request.num_prompt_tokens + len(request.output_token_ids) - k == 1:
                return self._schedule_decode(request, k)
        waiting = request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        if waiting and not self.can_admit_more():
            return self._fail("seqs")
        k = request.num_computed_tokens
        q = min(request.num_uncomputed_tokens, self.tokens_left)
        if max_new_tokens is not None:
            q = min(q, max_new_tokens)
        if q <= 0:
            return self._fail("budget")
        if respect_time_limit and self.time_limit_s is not None and q > 1:
            q = self.cost.max_chunk_within(k, q, self.time_limit_s)
            if q <= 0:
                return self._fail("time")
        new_blocks = self.kv.allocate(rid, k + q, reserve_blocks=reserve_blocks if waiting else 0)
        if new_blocks is None:
            return self._fail("kv")
        if waiting:
            self.core.admit(request)
        self._pending[rid] = _Pending(request, k, q, new_blocks, is_new=rid not in self.core.on_worker)
        self.tokens_used += q
        self.cost.add(q, k)
        return q

    def _schedule_decode(self, request: Request, k: int) -> int:
        """``schedule`` for one decode token: no chunking, no time-limit search, no admission.

        Every running request takes this path every few iterations, so it is the bulk of a
        decision's work; the result is exactly what the general path would produce.
        """
        if self.tokens_used >= self.token_budget:
            return self._fail("budget")
        rid = request.request_id
        new_blocks = self.kv.allocate(rid, k + 1)
        if new_blocks is None:
            return self._fail("kv")
        self._pending[rid] = _Pending(request, k, 1, new_blocks, is_new=rid not in self.core.on_worker)
        self.tokens_used += 1
        self.cost.add_decode(k)
        return 1

    def _can_run_ahead(self, request: Request) -> bool:
        """Whether a request with tokens still in flight (a pipelined lane) may run again now:
        only on the worker that holds those tokens (a waiting one must be recomputed from real
        ids, after its result), and only if it does not already reach ``max_tokens`` or the
        context with them (it stops when they arrive)."""
        return (request.status is RequestStatus.RUNNING
                and not request.reaches_length_limit(len(request.output_token_ids), self.core.profile.max_model_len))

    def _fail(self, reason: str) -> int:
        self.last_failure = reason
        return 0

    def preempt(self, victim: Request) -> None:
        """Preempt a running request by recompute: free its blocks and requeue it.

        If it was already placed in this batch, it is taken out again.
        """
        pending = self._pending.pop(victim.request_id, None)
        if pending is not None:
            self.tokens_used -= pending.num_new
            self.cost.remove(pending.num_new, pending.num_computed)
        self.core.preempt(victim)
        self.preempted.append(victim)

    # -- result -------------------------------------------------------------------------
    def build(self, iteration: int) -> BatchPlan:
        chunks = []
        kv = self.kv
        for p in self._pending.values():
            r = p.request
            rid = r.request_id
            chunks.append(
                ScheduledChunk(
                    request_id=rid,
                    num_computed_tokens=p.num_computed,
                    num_new_tokens=p.num_new,
                    new_block_ids=tuple(p.new_blocks),
                    # The whole table travels only to a worker that has not seen the request.
                    block_table=tuple(kv.block_table(rid)) if p.is_new else (),
                    is_new=p.is_new,
                    samples=p.num_computed + p.num_new == r.num_tokens,
                )
            )
        return BatchPlan(
            iteration=iteration,
            chunks=chunks,
            preempted_request_ids=[r.request_id for r in self.preempted],
            token_budget=self.token_budget,
            slo_min_s=self.slo_min_s,
            predicted_time_s=self.cost.time_s(),
        )
