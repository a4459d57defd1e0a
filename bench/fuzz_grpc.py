"""The gRPC side of the fuzzer: a case per call (method + raw request bytes), its strategy built
from the service's descriptor, and the call itself with its outcome classified.

Shared by ``tests/integration/test_fuzz_grpc.py`` (a bounded number under hypothesis) and
``bench/fuzz.py`` (the campaign). Calls are sent as raw bytes (``request_serializer=None``) so a
case can carry a damaged message (``fuzz_inputs.wire_bytes``); answers are decoded to look for
in-band errors (``WatchMany``'s ``WatchError.code``) and to learn request ids for later cases.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

from accelgen.profiles import load_profile
from accelgen.v1 import common_pb2, gateway_pb2, scheduler_pb2, worker_pb2
from bench.fuzz_inputs import Hints, message_strategy, wire_bytes

GATEWAY = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"]
SCHEDULER = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"]
WORKER = worker_pb2.DESCRIPTOR.services_by_name["Worker"]

PROFILE_JSON = json.dumps(load_profile().to_dict())

# A status no input may cause: a server fault (or a method the service says it has, missing).
BAD_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS,
             grpc.StatusCode.UNIMPLEMENTED}
BAD_CODE_NUMBERS = {c.value[0] for c in BAD_CODES}


class IdPool:
    """Request ids seen in answers, so later cases Cancel/Watch/Attach requests that exist."""

    def __init__(self, seed: tuple[str, ...] = ("r0", "r1")) -> None:
        self._ids = list(seed)
        self._lock = threading.Lock()
        self._fresh = itertools.count()

    def add(self, rid: str) -> None:
        if rid:
            with self._lock:
                self._ids.append(rid)
                del self._ids[:-64]

    def pick(self, i: int) -> str:
        with self._lock:
            return self._ids[i % len(self._ids)]

    def fresh(self, prefix: str) -> str:
        # Fixed width: the id's length must not change between Hypothesis's replays of one case
        # (a message's length sets the range of later draws: "Inconsistent data generation").
        return f"{prefix}{next(self._fresh):08d}-{time.monotonic_ns() % 1_000_000:06d}"

    def strategy(self) -> st.SearchStrategy[str]:
        return st.integers(0, 1 << 16).map(self.pick)

    def fresh_strategy(self, prefix: str) -> st.SearchStrategy[str]:
        return st.just(None).map(lambda _: self.fresh(prefix))


def _tokens(lo: int = 3, hi: int = 258, max_size: int = 8) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(lo, hi), min_size=1, max_size=max_size)


def _common_hints(pool: IdPool) -> dict[str, Any]:
    sp = "accelgen.v1.SamplingParams."
    return {
        sp + "max_new_tokens": lambda: st.integers(1, 8), sp + "temperature": lambda: st.floats(0, 2, width=32),
        sp + "top_p": lambda: st.floats(0.25, 1, width=32), sp + "top_k": lambda: st.integers(0, 50),
        "accelgen.v1.SLOSpec.ttft_ms": lambda: st.sampled_from([0.0, 1000.0, 60_000.0]),
        "accelgen.v1.SLOSpec.tbt_ms": lambda: st.sampled_from([0.0, 200.0, 1000.0]),
        "accelgen.v1.SLOSpec.jct_ms": lambda: st.sampled_from([0.0, 120_000.0]),
        "accelgen.v1.CancelRequest.request_id": pool.strategy,
        "accelgen.v1.GetRequestRequest.request_id": pool.strategy,
    }


def gateway_hints(pool: IdPool) -> Hints:
    return {**_common_hints(pool),
            "accelgen.v1.GenerateRequest.request_id": lambda: st.one_of(st.just(""), pool.fresh_strategy("fzg-")),
            "accelgen.v1.GenerateRequest.text": lambda: st.text(min_size=1, max_size=12),
            "accelgen.v1.TokenizedInput.input_ids[]": lambda: _tokens(),
            "accelgen.v1.GenerateRequest.app_class": lambda: st.sampled_from(["", "chat", "code", "batch"]),
            "accelgen.v1.AttachRequest.request_id": pool.strategy,
            "accelgen.v1.AttachRequest.from_token_index": lambda: st.integers(0, 20)}


def scheduler_hints(pool: IdPool, dead_address: str) -> Hints:
    wd = "accelgen.v1.WorkerDescription."
    return {**_common_hints(pool),
            "accelgen.v1.SubmitRequest.request_id": lambda: pool.fresh_strategy("fzs-"),
            "accelgen.v1.SubmitRequest.prompt_token_ids[]": lambda: _tokens(),
            "accelgen.v1.SubmitRequest.app_class": lambda: st.sampled_from(["", "chat", "code", "batch"]),
            "accelgen.v1.WatchRequest.request_id": pool.strategy,
            "accelgen.v1.WatchRequest.start_index": lambda: st.integers(0, 20),
            "accelgen.v1.WatchManyRequest.unwatch[]": lambda: st.lists(pool.strategy(), max_size=2),
            # Fuzzed workers never take the real worker's id: they would replace its lane.
            "accelgen.v1.RegisterWorkerRequest.worker_id": lambda: st.sampled_from(["fzw-0", "fzw-1", "fzw-2"]),
            "accelgen.v1.HeartbeatRequest.worker_id": lambda: st.sampled_from(["fzw-0", "fzw-1", "nobody"]),
            "accelgen.v1.DeregisterWorkerRequest.worker_id": lambda: st.sampled_from(["fzw-0", "fzw-1", "nobody"]),
            "accelgen.v1.RegisterWorkerRequest.address": lambda: st.just(dead_address),
            wd + "block_size": lambda: st.sampled_from([16, 128]),
            wd + "num_blocks": lambda: st.one_of(st.integers(2, 512), st.sampled_from([2**20, 2**20 + 1, 2**32 - 1])),
            wd + "max_model_len": lambda: st.sampled_from([0, 64, 2048]), wd + "profile_json": lambda: st.just(""),
            wd + "vocab_size": lambda: st.sampled_from([0, 300, 50272]),
            "accelgen.v1.RegisterWorkerRequest.description": lambda: st.builds(
                common_pb2.WorkerDescription, model=st.just("m"), executor=st.just("sim"),
                block_size=st.sampled_from([16, 128]), num_blocks=st.integers(2, 600),
                max_model_len=st.sampled_from([0, 2048]), vocab_size=st.sampled_from([0, 50272]),
                profile_json=st.sampled_from(["", "[]", "{}", '{"name": "x"}', PROFILE_JSON]))}


def worker_hints(pool: IdPool) -> Hints:
    sc = "accelgen.v1.ScheduledChunk."
    rid = st.sampled_from(["r0", "r1", "r2"])
    return {**_common_hints(pool),
            "accelgen.v1.BatchPlan.epoch": lambda: st.sampled_from(["e1", "e1", "e2"]),
            "accelgen.v1.BatchPlan.fence": lambda: st.just(0),
            "accelgen.v1.BatchPlan.predicted_time_s": lambda: st.floats(0, 0.01),
            "accelgen.v1.BatchPlan.freed_request_ids[]": lambda: st.lists(rid, max_size=2),
            sc + "request_id": lambda: rid, sc + "token_ids[]": lambda: _tokens(10, 5000),
            sc + "num_computed_tokens": lambda: st.integers(0, 16), sc + "prompt_len": lambda: st.integers(1, 16),
            sc + "num_output_tokens": lambda: st.integers(0, 4),
            sc + "new_block_ids[]": lambda: st.lists(st.integers(1, 20), max_size=2),
            sc + "block_table[]": lambda: st.lists(st.integers(1, 20), min_size=1, max_size=3)}


@dataclass
class GrpcCase:
    """One call: a method of the service and its request message(s) as bytes."""

    method: str
    payload: list[bytes]

    def describe(self) -> str:
        return f"{self.method}({[p[:200] for p in self.payload]!r})"


def case_strategy(service: ServiceDescriptor, hints: Hints, methods: tuple[str, ...] | None = None
                  ) -> st.SearchStrategy[GrpcCase]:
    """Any method of ``service`` (or of ``methods``) with schema-driven, sometimes damaged, requests."""
    per_method = []
    for m in service.methods:
        if methods is not None and m.name not in methods:
            continue
        messages = wire_bytes(message_strategy(m.input_type, hints))
        payloads = st.lists(messages, min_size=1, max_size=4) if m.client_streaming else messages.map(lambda b: [b])
        per_method.append(payloads.map(lambda p, name=m.name: GrpcCase(name, p)))
    return st.one_of(per_method)


@dataclass
class Outcome:
    code: str                     # "OK" or a StatusCode name
    details: str = ""
    responses: int = 0
    inband_bad: list[str] = field(default_factory=list)  # WatchError codes that are server faults

    @property
    def bad(self) -> bool:
        return self.code in {c.name for c in BAD_CODES} or bool(self.inband_bad)


def call(channel: grpc.Channel, service: ServiceDescriptor, case: GrpcCase, pool: IdPool | None = None,
         timeout_s: float = 10.0, stream_hold_s: float = 0.3, max_responses: int = 64,
         max_stream_s: float = 3.0) -> Outcome:
    """Send ``case``; a stream is read until it ends, ``max_responses`` or ``max_stream_s`` (then
    cancelled by us: a watch of a long request would otherwise hold the fuzzer for minutes)."""
    m: MethodDescriptor = service.methods_by_name[case.method]
    path = f"/{service.full_name}/{m.name}"
    out_cls = GetMessageClass(m.output_type)
    outcome = Outcome("OK")
    try:
        if not m.client_streaming and not m.server_streaming:
            reply = channel.unary_unary(path, response_deserializer=out_cls.FromString)(case.payload[0],
                                                                                         timeout=timeout_s)
            outcome.responses = 1
            _learn(reply, pool, outcome)
            return outcome
        if m.client_streaming:
            def requests() -> Iterator[bytes]:
                yield from case.payload
                time.sleep(stream_hold_s)  # keep the stream open a moment, as a gateway would

            stream = channel.stream_stream(path, response_deserializer=out_cls.FromString)(requests(),
                                                                                            timeout=timeout_s)
        else:
            stream = channel.unary_stream(path, response_deserializer=out_cls.FromString)(case.payload[0],
                                                                                           timeout=timeout_s)
        timer = threading.Timer(max_stream_s, stream.cancel)
        timer.start()
        try:
            for reply in stream:
                outcome.responses += 1
                _learn(reply, pool, outcome)
                if outcome.responses >= max_responses:
                    stream.cancel()
                    break
        finally:
            timer.cancel()
        return outcome
    except grpc.RpcError as exc:
        code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
        if code == grpc.StatusCode.CANCELLED and (m.client_streaming or m.server_streaming):
            return outcome  # we cancelled a long stream
        outcome.code = code.name
        outcome.details = (exc.details() or "")[:300] if callable(getattr(exc, "details", None)) else str(exc)
        return outcome


def _learn(reply: Any, pool: IdPool | None, outcome: Outcome) -> None:
    for e in getattr(reply, "errors", ()):  # WatchManyResponse
        if e.code in BAD_CODE_NUMBERS:
            outcome.inband_bad.append(f"{e.request_id}: {e.code} {e.message[:200]}")
    if pool is not None:
        rid = getattr(reply, "request_id", "")
        if isinstance(rid, str):
            pool.add(rid)
