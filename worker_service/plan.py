"""What a worker is asked to run and what it answers, as plain dataclasses.

These mirror the ``accelgen.v1`` worker messages but carry no protobuf: executors (the cost
model, vLLM's model runner) see only these types, and ``worker_service.convert`` is the one
place that translates. A plan is *exactly* what the scheduler decided; the worker adds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from accelgen.core.logprobs import TokenLogprob
from accelgen.core.request import SamplingParams

SAMPLED_INPUT = -1
"""The token id of a ``sampled_input`` chunk: the token this worker sampled for the request in
the previous plan (the scheduler decided this plan before it learnt that token)."""


@dataclass(frozen=True, slots=True)
class ChunkSpec:
    """One request's part of an iteration.

    ``token_ids`` run at positions ``num_computed_tokens ..``; ``samples`` asks for one token
    after the last of them. The full state (``block_table``, ``sampling``, ``prompt_len``)
    travels only when ``is_new``: the first time this worker sees the request, or a resync.
    Otherwise only ``new_block_ids`` (blocks appended this iteration) do. A ``sampled_input``
    decode (pipelined plans) runs the token this worker sampled for it in the previous plan.
    """

    request_id: str
    num_computed_tokens: int
    token_ids: list[int]
    new_block_ids: list[int]
    is_new: bool
    block_table: list[int]
    sampling: SamplingParams | None
    samples: bool
    num_output_tokens: int
    prompt_len: int
    sampled_input: bool = False  # token_ids == [SAMPLED_INPUT]: feed the token sampled last

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def end_position(self) -> int:
        """KV entries that exist once this chunk has run."""
        return self.num_computed_tokens + len(self.token_ids)


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    """One iteration. ``freed_request_ids`` are forgotten *before* the chunks run.

    ``epoch`` names the scheduler incarnation that sent the plan: a different epoch means the
    scheduler restarted and everything the worker holds about requests is stale. ``fence`` is
    the sender's leader-lease fencing token (0 = unfenced): the worker refuses a plan whose fence
    is below the highest it has seen, so a deposed scheduler cannot drive it.
    """

    iteration: int
    epoch: str
    chunks: list[ChunkSpec] = field(default_factory=list)
    freed_request_ids: list[str] = field(default_factory=list)
    predicted_time_s: float = 0.0
    fence: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


@dataclass(frozen=True, slots=True)
class ExecResult:
    """The answer to one plan: a token per sampling chunk and the time the model took, and the
    sampled token's logprobs for each sampling chunk whose request asked (``sampling.logprobs``)."""

    iteration: int
    sampled_token_ids: dict[str, int]
    elapsed_s: float
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)
