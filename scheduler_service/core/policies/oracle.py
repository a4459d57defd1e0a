"""Oracle: AccelGen with perfect knowledge of every request's output length.

What it optimises: goodput, by removing the one thing the online policies must guess. Knowing
each output length it (a) admits a request only if its *final* KV footprint fits beside the
final footprints of everything already running, so it never preempts and never recomputes,
(b) estimates ``T_e`` of JCT requests exactly, and (c) among requests of equal urgency starts the
one that will release its KV soonest (fewest remaining tokens).

Why it bounds the others: every policy here spends compute on two things it cannot know to be
wasted — recomputation after preemption and KV reserved for requests that cannot finish before
the cache runs out — and the oracle spends none on either while keeping AccelGen's SLO-aware
batching. It is not a proven optimum of the (NP-hard) offline problem; it is the reference for
how much output-length prediction (the paper's first open question) could still add.
Only the simulator can run it: the service never knows output lengths.
"""

from __future__ import annotations

from typing import Mapping

from scheduler_service.core.batch_builder import BatchBuilder
from scheduler_service.core.kv_blocks import blocks_for_tokens
from scheduler_service.core.policies.accelgen import AccelGenConfig, AccelGenPolicy
from scheduler_service.core.profile import DeviceProfile
from scheduler_service.core.request import Request
from scheduler_service.core.slo import SLOCatalog


class OraclePolicy(AccelGenPolicy):
    name = "oracle"

    def __init__(
        self,
        profile: DeviceProfile,
        catalog: SLOCatalog,
        output_lengths: Mapping[str, int],
        config: AccelGenConfig | None = None,
    ) -> None:
        super().__init__(profile, catalog, config)
        self.output_lengths = output_lengths

    def _final_tokens(self, request: Request) -> int:
        known = self.output_lengths.get(request.request_id)
        out = request.sampling.max_tokens if known is None else min(known, request.sampling.max_tokens)
        return min(request.num_prompt_tokens + out, self.profile.max_model_len)

    def remaining_output_tokens(self, request: Request) -> int:
        return max(1, self._final_tokens(request) - request.num_tokens)

    def admission_reserve_blocks(self, request: Request, batch: BatchBuilder) -> int:
        kv = batch.kv
        growth = sum(
            max(0, blocks_for_tokens(self._final_tokens(r), kv.block_size) - kv.num_blocks_of(r.request_id))
            for r in self.bound.running
        )
        whole = blocks_for_tokens(self._final_tokens(request), kv.block_size)
        first = blocks_for_tokens(min(request.num_tokens, max(1, batch.tokens_left)), kv.block_size)
        return max(0, whole - first) + growth

    def queue_key(self, request: Request, preempted: bool) -> tuple[float, int]:
        base = super().queue_key(request, preempted)
        return (base, self._final_tokens(request) - request.num_tokens)
