"""``SamplingParams`` <-> ``accelgen.v1.SamplingParams`` and JSON, checked once.

The range rules are the core type's (``SamplingParams.__post_init__``); this module builds it
from what a client sent and renames a failure to the client's field names. JSON is derived
from the dataclass's fields, so a new sampling field needs no edit here except its proto line
in each direction.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Mapping

from accelgen.core.fields import FieldError
from accelgen.core.request import MAX_STOP_TOKEN_IDS, SamplingParams
from accelgen.v1 import common_pb2

# Core field -> its name in a gRPC request (``SubmitRequest`` / ``GenerateRequest``).
PROTO_NAMES: Mapping[str, str] = {
    "max_tokens": "sampling_params.max_new_tokens",
    "temperature": "sampling_params.temperature",
    "top_p": "sampling_params.top_p",
    "top_k": "sampling_params.top_k",
    "logprobs": "sampling_params.logprobs",
}

# proto3 cannot say "no limit" for max_new_tokens except by leaving it unset, and the core
# needs a number: callers pass the room left in the context, which no output can exceed.
UNBOUNDED_MAX_TOKENS = 1 << 30


def sampling_from_proto(msg: common_pb2.SamplingParams, default_max_tokens: int = UNBOUNDED_MAX_TOKENS,
                        names: Mapping[str, str] = PROTO_NAMES) -> SamplingParams:
    """Proto -> core, validated. ``top_p == 0`` is proto3's "unset" and reads as 1; an unset
    ``max_new_tokens`` is ``default_max_tokens``. Raises ``FieldError`` named by ``names``."""
    if len(msg.stop_token_ids) > MAX_STOP_TOKEN_IDS:  # before copying them (a message may hold millions)
        raise FieldError("stop_token_ids", f"may hold at most {MAX_STOP_TOKEN_IDS} ids",
                         f"{len(msg.stop_token_ids)} ids").renamed(names)
    try:
        return SamplingParams(
            max_tokens=msg.max_new_tokens if msg.HasField("max_new_tokens") else default_max_tokens,
            temperature=msg.temperature,
            top_p=msg.top_p if msg.top_p != 0 else 1.0,
            top_k=msg.top_k,
            seed=msg.seed if msg.HasField("seed") else None,
            stop_token_ids=tuple(msg.stop_token_ids),
            ignore_eos=msg.ignore_eos,
            logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        )
    except FieldError as exc:
        raise exc.renamed(names) from None


def sampling_to_proto(sp: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
                                    max_new_tokens=sp.max_tokens, stop_token_ids=list(sp.stop_token_ids),
                                    ignore_eos=sp.ignore_eos)
    if sp.seed is not None:
        msg.seed = sp.seed
    if sp.logprobs is not None:
        msg.logprobs = sp.logprobs
    return msg


# Fields written only when set, so that a record of a request that does not use them reads in a
# scheduler from before they existed (a rolling restart back to it): it refuses unknown fields.
_OMITTED_WHEN_NONE = frozenset({"logprobs"})


def sampling_to_json(sp: SamplingParams) -> str:
    return json.dumps({f.name: _jsonable(getattr(sp, f.name)) for f in dataclasses.fields(sp)
                       if not (f.name in _OMITTED_WHEN_NONE and getattr(sp, f.name) is None)})


def sampling_from_json(text: str | bytes) -> SamplingParams:
    """The inverse of ``sampling_to_json``; fields a newer writer added are refused, not dropped."""
    data = json.loads(text)
    known = {f.name: f for f in dataclasses.fields(SamplingParams)}
    unknown = set(data) - set(known)
    if unknown:
        raise ValueError(f"stored sampling parameters have unknown field(s): {', '.join(sorted(unknown))}")
    return SamplingParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _jsonable(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value
