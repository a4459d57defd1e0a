"""``TokenLogprob`` <-> ``accelgen.v1.TokenLogprob``, and the compact bytes a store keeps.

The bytes form is what the scheduler appends to Redis with each output token of a request that
asked for logprobs: per token ``token_id`` (uint32), ``logprob`` (float32), ``rank`` (int32),
the number of top entries (uint32), then that many ``(token_id uint32, logprob float32)``. Each
token's record is self-delimiting, so records append exactly like the token ids they go with
(one APPEND per iteration) and a stored output decodes without knowing k. Float32 is what the
proto carries, so nothing is lost by storing it.
"""

from __future__ import annotations

import struct
from typing import Iterable, Mapping

from accelgen.core.logprobs import TokenLogprob
from accelgen.v1 import common_pb2

_HEAD = struct.Struct("<IfiI")
_TOP = struct.Struct("<If")


def logprob_to_proto(lp: TokenLogprob) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, rank=lp.rank,
                                   top=[common_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])


def logprob_from_proto(msg: common_pb2.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(token_id=msg.token_id, logprob=msg.logprob, rank=msg.rank,
                        top=tuple((t.token_id, t.logprob) for t in msg.top))


def logprobs_map_from_proto(msgs: Mapping[str, common_pb2.TokenLogprob]) -> dict[str, TokenLogprob]:
    """A worker result's ``logprobs`` map (request id -> the sampled token's)."""
    return {rid: logprob_from_proto(m) for rid, m in msgs.items()}


def pack_logprobs(lps: Iterable[TokenLogprob]) -> bytes:
    """Records as the store appends them (see the module docstring)."""
    parts = []
    for lp in lps:
        parts.append(_HEAD.pack(lp.token_id, lp.logprob, lp.rank, len(lp.top)))
        parts.extend(_TOP.pack(t, v) for t, v in lp.top)
    return b"".join(parts)


def unpack_logprobs(data: bytes | None) -> list[TokenLogprob]:
    """The inverse of ``pack_logprobs`` (float32 precision). ``ValueError`` on truncated bytes."""
    out: list[TokenLogprob] = []
    if not data:
        return out
    view, pos, end = memoryview(data), 0, len(data)
    while pos < end:
        if pos + _HEAD.size > end:
            raise ValueError(f"logprob record truncated at byte {pos} of {end}")
        token_id, logprob, rank, n = _HEAD.unpack_from(view, pos)
        pos += _HEAD.size
        if pos + n * _TOP.size > end:
            raise ValueError(f"logprob record of token {token_id} truncated ({n} top entries, {end - pos} bytes left)")
        top = tuple(_TOP.unpack_from(view, pos + i * _TOP.size) for i in range(n))
        pos += n * _TOP.size
        out.append(TokenLogprob(token_id, logprob, rank, top))
    return out
