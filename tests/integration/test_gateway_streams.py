"""Streams that go silent, Attach, and the gateway's owner id, against the fake scheduler.

The fake's ``hold_at`` keeps a WatchMany stream open but sends nothing more for a request (what
the issue saw: clients hung for minutes on a stream that never broke). The gateway must ask the
scheduler (GetRequest) after ``stream_idle_timeout_s``: progress it was not sent means a stuck
stream, re-opened from the delivered index; no progress (a long queue wait) means wait.
"""

from __future__ import annotations

import time
from typing import Iterator

import grpc
import httpx
import pytest

from accelgen.v1 import gateway_pb2, gateway_pb2_grpc
from tests.support.gateway_stack import GatewayStack

pytestmark = pytest.mark.integration

HELLO = [3 + b for b in b"Hello, world!"]


@pytest.fixture(scope="module")
def stack() -> Iterator[GatewayStack]:
    s = GatewayStack(stream_idle_timeout_s=0.3, reconnect_timeout_s=2.0, instance_id="gw-test")
    yield s
    s.close()


@pytest.fixture
def stub(stack: GatewayStack) -> Iterator[gateway_pb2_grpc.GatewayStub]:
    stack.reset()
    with grpc.insecure_channel(stack.grpc_target) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


def _ids(responses: list[gateway_pb2.GenerateResponse]) -> list[int]:
    return [t for r in responses if r.WhichOneof("response") == "chunk" for t in r.chunk.token_ids]


def _text(responses: list[gateway_pb2.GenerateResponse]) -> str:
    return "".join(r.chunk.text for r in responses if r.WhichOneof("response") == "chunk")


def test_submits_and_streams_carry_the_gateway_id(stack: GatewayStack, stub) -> None:
    list(stub.Generate(gateway_pb2.GenerateRequest(text="hi", stream=True), timeout=10))
    assert stack.fake.submits[0].owner == "gw-test"
    assert stack.fake.watch_many_messages and all(m.owner == "gw-test" for m in stack.fake.watch_many_messages)


def test_a_silent_stream_with_progress_is_reopened_from_the_delivered_index(stack: GatewayStack, stub) -> None:
    stack.reset(hold_at=5, batch_size=2)
    streams_before = stack.fake.watch_many_streams
    start = time.monotonic()
    out = list(stub.Generate(gateway_pb2.GenerateRequest(text="hi", stream=True), timeout=20))
    assert _ids(out) == HELLO and _text(out) == "Hello, world!"  # each token once, in order
    assert out[-1].complete.finish_reason == "stop"
    assert stack.fake.watch_many_streams == streams_before + 1  # the stuck stream was replaced
    rid = out[-1].request_id
    assert [i for r, i in stack.fake.watches if r == rid] == [0, 6]  # re-watched from what was delivered
    assert time.monotonic() - start < 10


def test_a_silent_request_without_progress_is_waited_for(stack: GatewayStack, stub) -> None:
    """A request queued for longer than the idle timeout is legitimate: checked, not cut."""
    stack.reset(hold_at=4, get_request_status="waiting")
    streams_before = stack.fake.watch_many_streams
    call = stub.Generate(gateway_pb2.GenerateRequest(text="hi", stream=True), timeout=20)
    got: list[gateway_pb2.GenerateResponse] = []
    for resp in call:
        got.append(resp)
        if len(_ids(got)) == 4:
            break
    assert stack.wait_for(lambda: len(stack.fake.get_requests) >= 3, timeout=10)  # checked, several times
    stack.fake.released = True
    got += list(call)
    assert _ids(got) == HELLO
    assert stack.fake.watch_many_streams == streams_before  # the same stream all along


def test_a_silent_stream_with_the_scheduler_unreachable_fails_unavailable(stack: GatewayStack, stub) -> None:
    stack.reset(hold_at=3, get_request_error=(grpc.StatusCode.UNAVAILABLE, "scheduler away"))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(gateway_pb2.GenerateRequest(text="hi", stream=True), timeout=20))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "Attach" in info.value.details()


def test_attach_streams_from_the_index_with_consistent_text(stack: GatewayStack, stub) -> None:
    full = list(stub.Generate(gateway_pb2.GenerateRequest(text="hi", stream=True, request_id="att-1"), timeout=10))
    rid = full[-1].request_id
    for k in (0, 5, 13):
        out = list(stub.Attach(gateway_pb2.AttachRequest(request_id=rid, from_token_index=k), timeout=10))
        assert _ids(out) == HELLO[k:]
        assert _text(full)[:k] + _text(out) == "Hello, world!"  # byte tokenizer: one char a token
        c = out[-1].complete
        assert list(c.output_ids) == HELLO and c.text == "Hello, world!" and c.finish_reason == "stop"
        assert c.completion_tokens == 13 and c.prompt_tokens == 2


def test_attach_errors(stack: GatewayStack, stub) -> None:
    rid = list(stub.Generate(gateway_pb2.GenerateRequest(text="hi", request_id="att-2"), timeout=10))[-1].request_id
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Attach(gateway_pb2.AttachRequest(request_id="att-2"), timeout=10))  # a label is no id
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Attach(gateway_pb2.AttachRequest(request_id=rid, from_token_index=14), timeout=10))
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE and "13 tokens" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Attach(gateway_pb2.AttachRequest(), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_http_request_state_and_events(stack: GatewayStack) -> None:
    stack.reset()
    r = httpx.post(stack.http_base + "/v1/completions",
                   json={"model": "fake-model", "prompt": "hi", "max_tokens": 20}, timeout=10)
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    state = httpx.get(f"{stack.http_base}/v1/requests/{r.json()['id']}", timeout=10).json()
    assert state["id"] == rid and state["text"] == "Hello, world!" and state["status"] == "finished"
    with httpx.stream("GET", f"{stack.http_base}/v1/requests/{rid}/events?from_token=7", timeout=10) as resp:
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    import json
    parsed = [json.loads(e) for e in events[:-1]]
    assert "".join(p["text"] for p in parsed) == "world!" and parsed[-1]["finish_reason"] == "stop"
    assert httpx.get(f"{stack.http_base}/v1/requests/nope", timeout=10).status_code == 404
    assert httpx.get(f"{stack.http_base}/livez", timeout=10).status_code == 200
