"""``SLO`` <-> ``accelgen.v1.SLOSpec`` and JSON, and the one check of an SLO a client sent.

A spec is milliseconds with 0 meaning "not set"; all zero means "the application class's
default" (``slo_from_proto`` returns None then; the caller knows the class). The gateway adds
the operator's bounds (``SLOBounds``); the scheduler accepts any valid SLO its gateway let in.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Mapping

from accelgen.core.fields import FieldError
from accelgen.core.slo import SLO
from accelgen.v1 import common_pb2

KINDS = ("ttft", "tbt", "jct")

# Kind -> its name in a gRPC request.
PROTO_NAMES: Mapping[str, str] = {"ttft": "slo.ttft_ms", "tbt": "slo.tbt_ms", "jct": "slo.jct_ms"}


@dataclass(frozen=True)
class SLOBounds:
    """(min, max) milliseconds a client may ask for, per kind: one client must not claim a 1 ms
    TBT and starve everyone else, nor a year-long deadline that holds KV forever."""

    ttft_ms: tuple[float, float]
    tbt_ms: tuple[float, float]
    jct_ms: tuple[float, float]

    def of(self, kind: str) -> tuple[float, float]:
        return getattr(self, f"{kind}_ms")


def slo_from_proto(spec: common_pb2.SLOSpec, names: Mapping[str, str] = PROTO_NAMES,
                   bounds: SLOBounds | None = None) -> SLO | None:
    """The SLO a spec asks for, or None for an empty spec (= the class default).

    Raises ``FieldError`` named by ``names``: a negative or non-finite value, TTFT without TBT
    (or the reverse), or a value outside ``bounds``."""
    values = {kind: getattr(spec, f"{kind}_ms") for kind in KINDS}
    for kind, value in values.items():
        if not (math.isfinite(value) and value >= 0):
            raise FieldError(names[kind], "must be a positive number of milliseconds (0 = class default)", value)
    if not any(values.values()):
        return None
    if bool(values["ttft"]) != bool(values["tbt"]):
        given, missing = ("ttft", "tbt") if values["ttft"] else ("tbt", "ttft")
        raise FieldError(names[missing], f"must be set with {names[given]}: an iteration-level SLO sets both "
                                         f"(or set only {names['jct']})")
    if bounds is not None:
        for kind, value in values.items():
            lo, hi = bounds.of(kind)
            if value and not lo <= value <= hi:
                raise FieldError(names[kind], f"= {value:g} is outside the allowed range [{lo:g}, {hi:g}] ms")
    return SLO(ttft_s=values["ttft"] / 1000 or None, tbt_s=values["tbt"] / 1000 or None,
               jct_s=values["jct"] / 1000 or None)


def slo_to_proto(slo: SLO) -> common_pb2.SLOSpec:
    return common_pb2.SLOSpec(ttft_ms=(slo.ttft_s or 0) * 1000, tbt_ms=(slo.tbt_s or 0) * 1000,
                              jct_ms=(slo.jct_s or 0) * 1000)


def slo_to_json(slo: SLO) -> str:
    return json.dumps({"ttft_s": slo.ttft_s, "tbt_s": slo.tbt_s, "jct_s": slo.jct_s})


def slo_from_json(text: str | bytes) -> SLO:
    return SLO(**json.loads(text))
