"""Hypothesis strategies for fuzzing every AccelGen surface; shared by the tests and ``bench.fuzz``.

Two kinds of input, mixed on purpose:

- **Schema-driven**: ``message_strategy(descriptor)`` builds any protobuf message from its
  descriptor (every field, every scalar type at its edges: 0, -1, the type's limits, NaN and
  infinities for floats, empty and long strings), so a new field or a new RPC (``Attach``) is
  fuzzed without an edit here. ``wire_bytes`` then mutates the serialised message (truncation,
  flipped bytes, garbage) so the servers also see what no well-behaved client can send.
- **Hand-written**: ``http_request`` writes OpenAI bodies with the fields the gateway knows,
  each either plausible (so inputs get past the first check) or hostile (wrong types, huge
  numbers, lone surrogates, deep nesting, a 4,300-digit integer), as raw bytes so the JSON itself
  may be broken.

A strategy is data only: no I/O, no clock. The callers (``tests/integration/test_fuzz_*``,
``bench/fuzz.py``) send the inputs and judge the answers.
"""

from __future__ import annotations

import json
import math
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

F = FieldDescriptor

# -- schema-driven protobuf messages --------------------------------------------------------------
_INT_LIMITS = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1), F.TYPE_SINT32: (-(2**31), 2**31 - 1), F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1), F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1), F.TYPE_SINT64: (-(2**63), 2**63 - 1), F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1), F.TYPE_FIXED64: (0, 2**64 - 1),
}


def _int_strategy(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = sorted({v for v in (lo, hi, 0, 1, -1, 2, 16, 255, 256, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1)
                    if lo <= v <= hi})
    return st.one_of(st.sampled_from(edges), st.integers(0, 64).filter(lambda v: lo <= v <= hi),
                     st.integers(lo, hi))


_TEXT = st.one_of(st.text(max_size=12), st.sampled_from(["", " ", "a", "x" * 300, "x" * 20_000, "\x00", "é", "😀",
                                                          "../etc", "{prefix}", "req:1", "*", "\n"]))


def _scalar(fd: FieldDescriptor) -> st.SearchStrategy[Any]:
    t = fd.type
    if t in _INT_LIMITS:
        return _int_strategy(*_INT_LIMITS[t])
    if t == F.TYPE_FLOAT:
        return st.one_of(st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 1e-45, 3.4e38, math.inf, -math.inf, math.nan]),
                         st.floats(width=32))
    if t == F.TYPE_DOUBLE:
        return st.one_of(st.sampled_from([0.0, 1.0, -1.0, 1e-300, 1e300, math.inf, -math.inf, math.nan, 50.0, 5000.0]),
                         st.floats())
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t == F.TYPE_STRING:
        return _TEXT
    if t == F.TYPE_BYTES:
        return st.binary(max_size=32)
    if t == F.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in fd.enum_type.values]), st.integers(-5, 100))
    raise ValueError(f"no strategy for field type {t} ({fd.full_name})")


Hints = Mapping[str, Callable[[], st.SearchStrategy[Any]]]
"""Field full name (``accelgen.v1.BatchPlan.epoch``) -> a strategy of realistic values, mixed in with
the schema's so inputs get past the first check and reach deeper code."""


def message_strategy(desc: Descriptor, hints: Hints | None = None, depth: int = 0,
                     max_repeated: int = 6) -> st.SearchStrategy[Message]:
    """Any message of type ``desc``: each field left unset or set to an edge or random value."""
    hints = hints or {}
    cls = GetMessageClass(desc)

    def value(fd: FieldDescriptor) -> st.SearchStrategy[Any]:
        if fd.type == F.TYPE_MESSAGE:
            base = st.deferred(lambda: message_strategy(fd.message_type, hints, depth + 1, max_repeated)) \
                if depth < 3 else st.just(GetMessageClass(fd.message_type)())
        else:
            base = _scalar(fd)
        hint = hints.get(fd.full_name)
        return st.one_of(hint(), hint(), base) if hint else base

    parts: dict[str, st.SearchStrategy[Any]] = {}
    for fd in desc.fields:
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            k, v = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
            parts[fd.name] = st.dictionaries(value(k), value(v), max_size=4)
        elif fd.is_repeated:
            hint_list = hints.get(fd.full_name + "[]")
            many = st.lists(value(fd), max_size=max_repeated)
            parts[fd.name] = st.one_of(hint_list(), many) if hint_list else many
        else:
            parts[fd.name] = value(fd)
    oneofs = {o.name: [f.name for f in o.fields] for o in desc.oneofs if not o.name.startswith("_")}

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        msg = cls()
        chosen = {name: draw(st.sampled_from([None, *names])) for name, names in oneofs.items()}
        in_oneof = {n for names in oneofs.values() for n in names}
        for name, strategy in parts.items():
            if name in in_oneof and name not in chosen.values():
                continue
            fd = desc.fields_by_name[name]
            hinted = fd.full_name in hints or fd.full_name + "[]" in hints
            # a field with realistic values is usually set (3 in 4), any other one half the time
            if name not in in_oneof and not (draw(st.integers(0, 3)) < 3 if hinted else draw(st.booleans())):
                continue
            _set(msg, desc.fields_by_name[name], draw(strategy))
        return msg

    return build()


def _set(msg: Message, fd: FieldDescriptor, v: Any) -> None:
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        target = getattr(msg, fd.name)
        for key, val in v.items():
            if fd.message_type.fields_by_name["value"].type == F.TYPE_MESSAGE:
                target[key].CopyFrom(val)
            else:
                target[key] = val
    elif fd.is_repeated:
        getattr(msg, fd.name).extend(v)
    elif fd.type == F.TYPE_MESSAGE:
        getattr(msg, fd.name).CopyFrom(v)
    else:
        setattr(msg, fd.name, v)


@st.composite
def wire_bytes(draw: st.DrawFn, messages: st.SearchStrategy[Message]) -> bytes:
    """A message's bytes, usually as serialised, sometimes damaged the way a buggy peer would."""
    raw = draw(messages).SerializeToString()
    how = draw(st.sampled_from(["as_is"] * 6 + ["truncate", "flip", "garbage", "append", "utf8"]))
    if how == "truncate" and raw:
        return raw[:draw(st.integers(0, len(raw) - 1))]
    if how == "flip" and raw:
        i = draw(st.integers(0, len(raw) - 1))
        return raw[:i] + bytes([raw[i] ^ draw(st.integers(1, 255))]) + raw[i + 1:]
    if how == "garbage":
        return draw(st.binary(max_size=64))
    if how == "append":
        return raw + draw(st.binary(min_size=1, max_size=16))
    if how == "utf8":  # field 1 as a length-delimited string of invalid UTF-8 (proto3 strings must be valid)
        return raw + b"\x0a\x03\xff\xfe\xfd"
    return raw


# -- OpenAI HTTP bodies ---------------------------------------------------------------------------
_JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                          st.text(max_size=8))
JSON_VALUES = st.recursive(_JSON_SCALARS, lambda c: st.one_of(st.lists(c, max_size=4),
                                                               st.dictionaries(st.text(max_size=6), c, max_size=4)),
                           max_leaves=8)
"""Any JSON value (NaN and huge or deep values come from ``HOSTILE`` and the raw-body mutations)."""

HOSTILE = st.sampled_from([
    None, True, False, 0, -1, 1, 2, 2**31, 2**63, -(2**63) - 1, 10**40, 1.5, -0.0, 1e308, "", "1", "NaN",
    "\udc80", [], {}, [None], [[]], [1, 2], {"a": 1}, "x" * 1000, [2**32], [-1], [1.5], ["a", "b"],
])


_SMALL_TOKENS = st.lists(st.integers(3, 258), min_size=1, max_size=8)
_MESSAGES = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant"]), "content": st.text(min_size=1, max_size=12)}),
    min_size=1, max_size=3)

# Each field the gateway knows, with values a real client would send (mostly accepted).
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from(["fake-model", "alias", "other", "sim", None]),
    "prompt": st.one_of(st.text(min_size=1, max_size=16), _SMALL_TOKENS, st.lists(_SMALL_TOKENS, max_size=2),
                        st.lists(st.integers(0, 2**32 + 5), min_size=1, max_size=4)),
    "messages": _MESSAGES,
    "max_tokens": st.integers(-1, 20), "max_completion_tokens": st.integers(-1, 20),
    "temperature": st.floats(0, 2), "top_p": st.floats(0, 1), "top_k": st.integers(-2, 50),
    "seed": st.integers(-(2**63), 2**63 - 1), "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "stop_token_ids": st.lists(st.integers(0, 300), max_size=3), "ignore_eos": st.booleans(),
    "n": st.sampled_from([1, None, 2, 0]), "best_of": st.sampled_from([None, 1, 2]),
    "logprobs": st.sampled_from([None, 0, 1, True]),
    "echo": st.booleans(), "stop": st.one_of(st.none(), st.text(max_size=3), st.lists(st.text(max_size=3))),
    "presence_penalty": st.floats(-2, 2), "repetition_penalty": st.sampled_from([1, 1.0, 1.2]),
    "logit_bias": st.dictionaries(st.text(max_size=3), st.integers(-100, 100), max_size=2),
    "app_class": st.sampled_from(["chat", "code", "batch", "summarization", "nope"]),
    "slo_ttft_ms": st.floats(0, 1e6), "slo_tbt_ms": st.floats(0, 1e5), "slo_jct_ms": st.floats(0, 1e8),
    "user": st.text(max_size=5),
}


def _hostile_value() -> st.SearchStrategy[Any]:
    return st.one_of(HOSTILE, JSON_VALUES)


_HEADER_VALUE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20).map(str.strip)
HEADERS = st.dictionaries(
    st.sampled_from(["x-request-id", "x-accelgen-app-class", "x-accelgen-slo-ttft-ms", "x-accelgen-slo-tbt-ms",
                     "x-accelgen-slo-jct-ms", "content-type"]),
    st.one_of(_HEADER_VALUE, st.sampled_from(["nan", "inf", "-1", "50", "1e400", "application/json", "a" * 200])),
    max_size=3)


@dataclass
class HttpInput:
    """One HTTP request to send: method, path, headers and the raw body."""

    method: str
    path: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        shown = self.body[:300] + (b"..." if len(self.body) > 300 else b"")
        return f"{self.method} {self.path} headers={self.headers} body={shown!r} ({len(self.body)} bytes)"


def _deep(n: int) -> bytes:
    return b'{"prompt": "a", "user": ' + b"[" * n + b"]" * n + b"}"


RAW_BODIES = st.sampled_from([
    b"", b"{", b"null", b"[]", b'"x"', b"1", b"{}", b'{"prompt": "a", "max_tokens": ' + b"9" * 4300 + b"}",
    b'{"prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}", b'{"prompt": "a", "temperature": NaN}',
    b'{"prompt": "a", "temperature": Infinity}', b'{"prompt": "a", "top_p": -Infinity}',
    b'{"prompt": "a", "temperature": 1e999}', b'{"prompt": "\xff\xfe"}', b'\xef\xbb\xbf{"prompt": "a"}',
    b'{"prompt": "\\ud800", "max_tokens": 2}', b'{"messages": [{"role": "\\udc80", "content": "a"}]}',
    b'{"prompt": "a", "model": "\\udfff"}', b'{"prompt": "a", "app_class": "\\ud800"}',
    _deep(200), _deep(5000), _deep(100_000), b'{"prompt": [' + b"1," * 100_000 + b'1], "max_tokens": 1}',
    b'{"prompt": "a", "n": ' + b"1" * 600 + b"}", b'{"prompt": "a", "a": 1, "a": 2}', b"\x00\x7b\x00\x7d",
    b'{"prompt": "a", "max_tokens": 1.0}', b'{"prompt": "a", "max_tokens": 1e3}', b'{"prompt": "a", "seed": -0}',
])


@st.composite
def json_body(draw: st.DrawFn, chat: bool) -> bytes:
    """A body with the required field and a few others, plausible; often one of them hostile
    (a wrong type, an edge value, any JSON), so each check is reached with the rest valid."""
    required = "messages" if chat else "prompt"
    names = draw(st.lists(st.sampled_from(sorted(PLAUSIBLE)), max_size=4, unique=True))
    body = {name: draw(PLAUSIBLE[name]) for name in [required, *names]}
    for _ in range(draw(st.sampled_from([1, 0, 1, 0, 1, 2]))):
        body[draw(st.sampled_from(sorted(PLAUSIBLE)))] = draw(_hostile_value())
    # Rare branches test the *largest* draw: hypothesis favours small ones (0 above all).
    if draw(st.integers(0, 99)) >= 90:
        body[draw(st.text(max_size=8))] = draw(JSON_VALUES)
    if draw(st.integers(0, 99)) >= 95:
        body.pop(required, None)
    text = json.dumps(body, allow_nan=True, ensure_ascii=draw(st.booleans()))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate with ensure_ascii=False: send it escaped
        return json.dumps(body, allow_nan=True).encode()


@st.composite
def http_request(draw: st.DrawFn, huge_bodies: bool = True) -> HttpInput:
    """A request to the gateway's HTTP server: mostly POSTs of OpenAI bodies, some anything else."""
    which = draw(st.sampled_from(["completion"] * 5 + ["chat"] * 4 + ["raw", "other"]))
    headers = draw(st.one_of(st.just({}), HEADERS)) if draw(st.booleans()) else {}
    if which == "other":
        method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]))
        path = draw(st.sampled_from(["/v1/models", "/health", "/livez", "/", "/v1/completions", "/v1/chat/completions",
                                     "/v1/embeddings", "/v1/models/x", "/v1//completions", "/%ff",
                                     "/v1/completions?x=1",
                                     "/v1/requests/", "/v1/requests/{id}", "/v1/requests/{id}/events",
                                     "/v1/requests/{id}/events?from_token={n}", "/v1/requests/{id}?x={n}"]))
        rid = draw(st.one_of(st.sampled_from(["r0", "x" * 20_000, "..", "%2F", "%ff", "%00", "a b"]),
                             st.text(max_size=8)))
        n = draw(st.one_of(st.integers(-5, 40), st.sampled_from([2**31, 2**64, 10**5000]), st.text(max_size=4)))
        path = path.replace("{id}", urllib.parse.quote(rid, safe="%")).replace(
            "{n}", urllib.parse.quote(str(n) if not isinstance(n, int) or n < 10**100 else "9" * 5000, safe=""))
        body = draw(st.one_of(st.just(b""), RAW_BODIES)) if method in ("POST", "PUT", "PATCH") else b""
        return HttpInput(method, path, body, headers)
    path = "/v1/chat/completions" if which == "chat" else "/v1/completions"
    if which == "raw":
        body = draw(RAW_BODIES)
        if not huge_bodies and len(body) > 20_000:
            body = body[:20_000]
        return HttpInput("POST", path, body, headers)
    return HttpInput("POST", path, draw(json_body(chat=which == "chat")), headers)
