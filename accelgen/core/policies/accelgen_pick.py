"""AccelGen's multi-resource-aware pick (paper, mechanism 3), apart from the policy that uses it.

After the urgent requests, the batch is filled by repeatedly placing the request whose
(compute, KV) demand is closest, by Euclidean distance with both axes normalised by capacity,
to what is still free, so neither compute nor KV is left idle. The pick is quadratic in the
candidates it prices, so candidates that must fail as the last refused one did are pruned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from accelgen.core.batch_builder import BatchBuilder
from accelgen.core.kv_blocks import blocks_for_tokens
from accelgen.core.request import Request, RequestStatus

if TYPE_CHECKING:
    from accelgen.core.policies.accelgen import AccelGenPolicy


@dataclass(slots=True)
class FillState:
    long_prefills: int
    tried: set = field(default_factory=set)
    refusal: str = ""  # why the last _place refused before scheduling: "era", "slo" or ""


def room_for_prefill(batch: BatchBuilder) -> bool:
    """Budget left, and time for at least a two-token chunk of a fresh prompt."""
    if batch.tokens_used >= batch.token_budget:
        return False
    return batch.time_limit_s is None or batch.cost.time_if_added_s(2, 0) <= batch.time_limit_s


def euclidean_fill(policy: "AccelGenPolicy", batch: BatchBuilder, requests: list[Request], state: FillState) -> None:
    """Repeatedly place the request whose (compute, KV) demand is closest to what is free.

    Both axes are normalised by capacity (token budget, usable blocks). A request's KV
    demand is what it still needs to finish its prefill (a waiting one: its whole prompt
    plus headroom); it does not change while the batch is built, so it is computed once.
    """
    if not room_for_prefill(batch):
        return  # before pricing the pool: under load this is the common case
    kv = batch.kv
    total_blocks = kv.total_usable_blocks
    budget = max(1, batch.token_budget)
    running = RequestStatus.RUNNING
    pool = []
    for r in requests:
        if r.status is running:
            need_blocks = kv.blocks_to_grow(r.request_id, r.num_tokens)
        else:
            need_blocks = blocks_for_tokens(policy.expected_final_tokens(r), kv.block_size)
        pool.append((r, r.num_uncomputed_tokens, need_blocks / total_blocks))
    while pool and room_for_prefill(batch):
        left = batch.tokens_left
        a_c = left / budget
        a_m = kv.num_free_blocks / total_blocks
        best_i, best_d = 0, math.inf
        for i, (_, uncomputed, d_m) in enumerate(pool):
            d_c = (uncomputed if uncomputed < left else left) / budget
            d = (a_c - d_c) ** 2 + (a_m - d_m) ** 2
            if d < best_d:
                best_i, best_d = i, d
        request, _, need = pool.pop(best_i)
        batch.last_failure = ""
        if policy.place(batch, request, state) == 0:
            pool = prune_after_refusal(policy, batch, pool, request, state.refusal or batch.last_failure, need)

def prune_after_refusal(policy: "AccelGenPolicy", batch: BatchBuilder, pool: list, refused: Request, failure: str,
                    need: float) -> list:
    """Drop the candidates that must fail as the one just refused did: under load the window
    is full of prompts that cannot go in, and pricing each of them in turn (the pick is
    quadratic) was most of the decision's time. A batch only grows while it is built, so:
    free blocks and the KV reserve only tighten (a waiting prompt needing at least as many
    blocks cannot fit either; none once the sequence limit is hit), ERA stays closed to
    every long prompt that has not started, and a batch too big for one SLO is too big for
    any tighter one."""
    running = RequestStatus.RUNNING
    if failure == "seqs":
        return [e for e in pool if e[0].status is running]
    if failure == "kv" and refused.status is not running:
        return [e for e in pool if e[0].status is running or e[2] < need]
    if failure == "era":
        budget = batch.token_budget
        return [e for e in pool if e[0].num_computed_tokens > 0 or not policy.is_long(e[0], budget)]
    if failure == "slo":
        bound = policy.effective_tbt(refused)
        return [e for e in pool if (t := policy.effective_tbt(e[0])) is None or t > bound]  # type: ignore[operator]
    return pool
