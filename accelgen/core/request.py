"""The request model: what a client asked for, and how far it has got.

A request's tokens are its prompt followed by what it has generated. ``num_computed_tokens``
counts the tokens whose KV entries exist on the worker; everything from there to the end still
has to run through the model. A freshly admitted request and one preempted by recompute look
the same: nothing computed, everything to prefill (vLLM's recompute semantics), which is why
a preempted request needs no special path.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from accelgen.core.fields import FieldError
from accelgen.core.logprobs import MAX_LOGPROBS
from accelgen.core.slo import SLO, slo_group

PENDING_TOKEN = -1
"""Stands in ``output_token_ids`` for a token an in-flight plan samples (pipelined lanes): the
worker holds it, the scheduler learns it with that plan's result. No real token id is negative."""


class RequestStatus(enum.IntEnum):
    """Ordered so that ``status >= FINISHED`` means the request is done."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED = 3
    CANCELLED = 4

    @property
    def is_done(self) -> bool:
        return self >= RequestStatus.FINISHED


class FinishReason(str, enum.Enum):
    """Why a request ended; the names follow OpenAI's / vLLM's ``finish_reason``."""

    STOP = "stop"  # a stop token (EOS or a client stop id) was sampled
    LENGTH = "length"  # max_tokens reached, or the model context is full
    CANCELLED = "abort"  # the client cancelled


MAX_STOP_TOKEN_IDS = 1024  # each is checked on every sampled token; and a request's record holds them


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Sampling parameters, passed through to the model runner unchanged."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None = no logprobs; k = the sampled token's plus the top k (vLLM's meaning)

    def __post_init__(self) -> None:
        """The one place sampling parameters are range-checked: ``accelgen.wire.sampling``
        builds this from what clients send and reports a ``FieldError`` under their field names."""
        if self.max_tokens < 1:
            raise FieldError("max_tokens", "must be >= 1", self.max_tokens)
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise FieldError("temperature", "must be >= 0 (0 = greedy)", self.temperature)
        if not 0 < self.top_p <= 1:
            raise FieldError("top_p", "must be in (0, 1] (0 = unset = 1)", self.top_p)
        if self.top_k < 0:
            raise FieldError("top_k", "must be >= 0 (0 disables top-k)", self.top_k)
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise FieldError("stop_token_ids", f"may hold at most {MAX_STOP_TOKEN_IDS} ids",
                             f"{len(self.stop_token_ids)} ids")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise FieldError("logprobs", f"must be in 0..{MAX_LOGPROBS} (the number of most likely tokens "
                             "returned with each sampled token; unset = no logprobs)", self.logprobs)


@dataclass(slots=True, eq=False)
class Request:
    """One generation request and its progress. Identity is the request id."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    slo: SLO
    app_class: str
    arrival_s: float
    eos_token_id: int | None = None

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    first_token_s: float | None = None
    last_token_s: float | None = None
    finish_s: float | None = None
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    # Trailing ``PENDING_TOKEN`` entries of ``output_token_ids``: tokens sampled by plans still in
    # flight (``SchedulerCore.dispatch``). Always 0 where each plan completes before the next.
    num_pending_outputs: int = 0
    group: int = field(init=False)
    num_prompt_tokens: int = field(init=False)  # cached: read on every scheduling decision

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty")
        self.group = slo_group(self.slo)
        self.num_prompt_tokens = len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_known_outputs(self) -> int:
        """Outputs whose ids are known (``num_output_tokens`` less those still in flight)."""
        return len(self.output_token_ids) - self.num_pending_outputs

    def drop_pending_outputs(self) -> None:
        """Forget the tokens of plans in flight (the request ended, or its worker is gone)."""
        if self.num_pending_outputs:
            del self.output_token_ids[-self.num_pending_outputs:]
            self.num_pending_outputs = 0

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + len(self.output_token_ids)

    def reaches_length_limit(self, num_outputs: int, max_model_len: int) -> bool:
        """Whether ``num_outputs`` outputs end the request by length: ``max_tokens``, or a full context."""
        return num_outputs >= self.sampling.max_tokens or self.num_prompt_tokens + num_outputs >= max_model_len

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_prompt_tokens + len(self.output_token_ids) - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        """True while more than the last sampled token still has to be computed."""
        out = self.output_token_ids
        return not out or self.num_prompt_tokens + len(out) - self.num_computed_tokens > 1

    @property
    def iteration_slo_s(self) -> float | None:
        return self.slo.iteration_s

    def next_token_deadline_s(self) -> float:
        """When the next token is due: the TTFT bound first, then one TBT after the last token.

        JCT-only requests have one deadline, the completion of the whole job.
        """
        slo = self.slo
        if slo.tbt_s is None:
            assert slo.jct_s is not None  # guaranteed by SLO.__post_init__
            return self.arrival_s + slo.jct_s
        if self.last_token_s is None:
            assert slo.ttft_s is not None
            return self.arrival_s + slo.ttft_s
        return self.last_token_s + slo.tbt_s

    def next_deadline_after_arrival_s(self) -> float:
        """The first deadline the request had: arrival + TTFT (or + JCT for a JCT-only one)."""
        slo = self.slo
        budget = slo.ttft_s if slo.ttft_s is not None else slo.jct_s
        assert budget is not None  # guaranteed by SLO.__post_init__
        return self.arrival_s + budget
