"""The batch plan: the scheduler's decision for one iteration, as plain data.

A plan says, for every scheduled request, which tokens run (``num_computed_tokens`` onwards,
``num_new_tokens`` of them) and which KV blocks are new. A worker that has not seen the request
(``is_new``) gets the whole block table and the sampling parameters; after that only appended
blocks travel ("full data once, then diffs"). ``freed_request_ids`` tells the worker which
requests to forget: finished, cancelled and preempted ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from accelgen.core.logprobs import TokenLogprob

@dataclass(slots=True)
class ScheduledChunk:
    """One request's share of an iteration. Treat it as immutable once built; it is not
    ``frozen`` only because a frozen dataclass's ``__init__`` costs four times as much, and the
    builder makes one per scheduled request on every iteration (the decision's hot path)."""

    request_id: str
    num_computed_tokens: int  # KV entries that already exist before this iteration
    num_new_tokens: int  # tokens run in this iteration (prompt chunk, or 1 for a decode)
    new_block_ids: tuple[int, ...]  # blocks appended this iteration
    block_table: tuple[int, ...]  # the whole table after this iteration, only when ``is_new``
    is_new: bool  # first iteration of this request on the worker (after admission or preemption)
    samples: bool  # the chunk reaches the last token: the worker samples one token for it

    @property
    def is_decode(self) -> bool:
        return self.num_new_tokens == 1 and self.num_computed_tokens > 0 and self.samples


@dataclass(slots=True)
class BatchPlan:
    iteration: int
    chunks: list[ScheduledChunk] = field(default_factory=list)
    freed_request_ids: list[str] = field(default_factory=list)
    preempted_request_ids: list[str] = field(default_factory=list)
    token_budget: int = 0
    slo_min_s: float | None = None
    predicted_time_s: float = 0.0
    # Set by ``SchedulerCore.dispatch``: the core already counts this plan as run (computed
    # tokens advanced, a ``PENDING_TOKEN`` per sampled token) so the next plan can be decided
    # while it executes; ``complete`` then fills the tokens in instead of appending them.
    dispatched: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks

    def request_ids(self) -> list[str]:
        return [c.request_id for c in self.chunks]


@dataclass(frozen=True, slots=True)
class IterationResult:
    """What a worker (or the simulated executor) reports back for one plan."""

    iteration: int
    sampled_token_ids: dict[str, int]  # request id -> token, for chunks with ``samples``
    elapsed_s: float
    # request id -> the sampled token's logprobs, for the sampled requests that asked for them
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)
