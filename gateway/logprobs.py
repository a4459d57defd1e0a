"""A sampled token's log probabilities as the gateway's front ends see them.

The worker's model runner computes them (``SamplingParams.logprobs`` = k asks for the sampled
token's logprob and rank plus the k most likely tokens), the scheduler stores them with the
tokens and sends them on ``TokenBatch.logprobs``, one per token. ``Delta.logprobs`` and
``Outcome.logprobs`` (``gateway.generation``) hold them as ``TokenLogprobInfo``, aligned with the
token ids, so the OpenAI and gRPC front ends format them without touching protobuf here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from accelgen.v1 import common_pb2


@dataclass(frozen=True)
class TokenLogprobInfo:
    """One output token: its id, its logprob, its rank (1 = most likely) and the top-k
    ``(token id, logprob)`` pairs, most likely first (empty when k = 0)."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]] = field(default_factory=list)


def logprob_from_proto(msg: common_pb2.TokenLogprob) -> TokenLogprobInfo:
    return TokenLogprobInfo(token_id=msg.token_id, logprob=msg.logprob, rank=msg.rank,
                            top=[(t.token_id, t.logprob) for t in msg.top])


def logprobs_from_proto(msgs: Iterable[common_pb2.TokenLogprob]) -> list[TokenLogprobInfo]:
    return [logprob_from_proto(m) for m in msgs]
