"""The per-request state a model runner keeps between iterations, and the checks on a plan.

vLLM's runner remembers, for each request it has been given, its prompt length, sampling
parameters and block table, and it cannot run a request it was never given or attend over KV
entries it never computed. This table keeps exactly that (no queue, no allocator: the block
ids come from the scheduler) so every executor rejects the same bad plans with the same
messages, *before* anything runs.

A plan is checked as a whole and applied atomically: ``prepare`` builds the state after the
plan without touching the table, ``commit`` installs it once the iteration has run. A rejected
or failed plan leaves the worker exactly as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

from accelgen.core.request import SamplingParams
from worker_service.plan import ChunkSpec, WorkerPlan


@dataclass(frozen=True, slots=True)
class RequestState:
    """What the worker holds for one request once a plan has run."""

    prompt_len: int
    num_computed_tokens: int  # KV entries that exist on this worker
    block_table: tuple[int, ...]
    sampling: SamplingParams | None
    # Tokens whose ids the scheduler sent with is_new: the prompt, plus the outputs of a request
    # being recomputed. Beyond them every token is one this worker sampled.
    known_len: int = 0


@dataclass(frozen=True, slots=True)
class PreparedPlan:
    """The table after ``plan`` ran, and each chunk's state in plan order."""

    plan: WorkerPlan
    states: tuple[RequestState, ...]
    requests: dict[str, RequestState]


class RequestTable:
    """Requests this worker has been given, checked against the pool's limits."""

    def __init__(self, num_blocks: int, block_size: int, max_model_len: int, vocab_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self._requests: dict[str, RequestState] = {}

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._requests

    def __len__(self) -> int:
        return len(self._requests)

    def get(self, request_id: str) -> RequestState | None:
        return self._requests.get(request_id)

    def reset(self) -> None:
        self._requests = {}

    def prepare(self, plan: WorkerPlan) -> PreparedPlan:
        """Check ``plan`` against the table; ``ValueError`` names the chunk and what to resend."""
        requests = dict(self._requests)  # copy-on-write: states are immutable
        for rid in plan.freed_request_ids:
            requests.pop(rid, None)  # freeing an unknown id is harmless (e.g. after a reset)
        states = []
        for i, chunk in enumerate(plan.chunks):
            state = self._next_state(f"chunks[{i}] (request {chunk.request_id!r})", chunk, requests)
            requests[chunk.request_id] = state
            states.append(state)
        return PreparedPlan(plan, tuple(states), requests)

    def commit(self, prepared: PreparedPlan) -> None:
        self._requests = prepared.requests

    # -- checks ---------------------------------------------------------------------------
    def _next_state(self, where: str, c: ChunkSpec, requests: dict[str, RequestState]) -> RequestState:
        if c.is_new:
            if c.num_computed_tokens != 0:
                raise ValueError(
                    f"{where}: is_new with num_computed_tokens={c.num_computed_tokens}; a request new to "
                    "this worker has no KV here, so it must start at 0 (recompute)"
                )
            self._check_blocks(where, "block_table", c.block_table)
            prompt_len, table, sampling = c.prompt_len, tuple(c.block_table), c.sampling
            known_len = c.prompt_len + c.num_output_tokens
            if c.num_computed_tokens + len(c.token_ids) > known_len:
                raise ValueError(f"{where}: is_new chunk runs past prompt_len + num_output_tokens = {known_len}")
        else:
            old = requests.get(c.request_id)
            if old is None:
                raise ValueError(
                    f"{where}: request {c.request_id!r} is unknown to this worker (never sent with is_new, "
                    "freed, or forgotten on an epoch change); resend it with is_new and its full state"
                )
            if c.num_computed_tokens > old.num_computed_tokens:
                raise ValueError(
                    f"{where}: num_computed_tokens={c.num_computed_tokens} but only "
                    f"{old.num_computed_tokens} KV entries exist on this worker"
                )
            self._check_blocks(where, "new_block_ids", c.new_block_ids)
            prompt_len, table, sampling = old.prompt_len, old.block_table + tuple(c.new_block_ids), old.sampling
            known_len = old.known_len
            start, stop = c.num_computed_tokens, c.num_computed_tokens + len(c.token_ids)
            if c.sampled_input and start < known_len:
                raise ValueError(f"{where}: sampled_input at position {start}, but this worker sampled no token "
                                 f"there (the {known_len} tokens sent with is_new reach past it); send its id")
            if start < known_len < stop:
                raise ValueError(f"{where}: positions {start}..{stop - 1} straddle the end of the tokens sent "
                                 f"with is_new ({known_len}) on this worker; resend it with is_new")
        end = c.num_computed_tokens + len(c.token_ids)
        if end > self.max_model_len:
            raise ValueError(f"{where}: runs to position {end}, beyond max_model_len={self.max_model_len}")
        if end > len(table) * self.block_size:
            raise ValueError(
                f"{where}: {end} tokens need {-(-end // self.block_size)} blocks of {self.block_size}, "
                f"its block table has {len(table)}"
            )
        bad = [t for t in c.token_ids if t >= self.vocab_size]
        if bad:
            raise ValueError(f"{where}.token_ids: {bad[0]} is not below vocab_size={self.vocab_size}")
        if c.samples != (end >= known_len):
            # vLLM samples exactly when a chunk reaches the last known token; every executor
            # holds plans to that, so the sim rejects what a vLLM worker would.
            raise ValueError(f"{where}: samples={c.samples} but the chunk "
                             f"{'reaches' if end >= known_len else 'stops short of'} the request's last token")
        return RequestState(prompt_len, end, table, sampling, known_len)

    def _check_blocks(self, where: str, field: str, block_ids: list[int]) -> None:
        for b in block_ids:
            if not 0 < b < self.num_blocks:
                raise ValueError(
                    f"{where}.{field}: block id {b} is outside 1..{self.num_blocks - 1} "
                    "(block 0 is vLLM's reserved null block)"
                )
