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

from scheduler_service.core.policies.accelgen import AccelGenConfig, AccelGenPolicy
from scheduler_service.core.profile import DeviceProfile
from scheduler_service.core.request import Request
from scheduler_service.core.slo import SLOCatalog


class OraclePolicy(AccelGenPolicy):
    name = "oracle"
    reserves_exact_growth = True

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

    def expected_final_tokens(self, request: Request) -> int:
        return self._final_tokens(request)

    def _running_growth_blocks(self) -> int:
        kv = self.bound.kv
        return sum(self._growth_blocks(r, kv.block_size) for r in self.bound.running)

    def remaining_work(self, request: Request) -> int:
        """Tokens still to run through the model: the rest of the prompt and every output."""
        return self._final_tokens(request) - request.num_computed_tokens

    def queue_key(self, request: Request, preempted: bool) -> tuple:
        late, _ = super().queue_key(request, preempted)
        return (late, self.remaining_work(request), request.arrival_s)

    def candidate_order(self, request: Request) -> tuple:
        # Shortest remaining work first among savable requests: with lengths known, this frees
        # KV and compute soonest and so serves the most requests within their SLOs.
        return (request.request_id in self._late, self.remaining_work(request), request.arrival_s)
