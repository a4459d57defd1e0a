"""A sampled token's log probabilities: what a worker reports when a request asks for them.

``SamplingParams.logprobs`` = k (vLLM's meaning) asks, for every output token, its logprob, its
rank in the distribution it was sampled from (1 = the most likely token) and the k most likely
tokens with theirs. The worker computes them when it samples the token, the scheduler carries
them with the token (stored with the output, delivered with it) and never recomputes them: a
recompute after a preemption re-runs tokens already sampled without sampling them again, so each
token keeps the logprobs of the moment it was sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_LOGPROBS = 20
"""The most top tokens a request may ask for (vLLM's default ``max_logprobs``)."""


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One sampled token: its id, logprob and rank, and the top-k ``(token id, logprob)`` pairs,
    most likely first."""

    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...] = ()
