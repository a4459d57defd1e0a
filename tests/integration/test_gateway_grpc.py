"""The Gateway gRPC service against an in-process fake scheduler (real gRPC, free ports)."""

from __future__ import annotations

from typing import Iterator

import grpc
import pytest
from structlog.testing import capture_logs

from accelgen.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.support.gateway_stack import GatewayStack

pytestmark = pytest.mark.integration

HELLO = [3 + b for b in b"Hello, world!"]


@pytest.fixture(scope="module")
def stack() -> Iterator[GatewayStack]:
    s = GatewayStack(reconnect_timeout_s=3.0)
    yield s
    s.close()


@pytest.fixture
def stub(stack: GatewayStack) -> Iterator[gateway_pb2_grpc.GatewayStub]:
    stack.reset()
    with grpc.insecure_channel(stack.grpc_target) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


def _generate(stub: gateway_pb2_grpc.GatewayStub, **fields) -> list[gateway_pb2.GenerateResponse]:
    if "tokenized" not in fields:
        fields.setdefault("text", "hi")
    return list(stub.Generate(gateway_pb2.GenerateRequest(**fields), timeout=10))


def _streamed_ids(responses: list[gateway_pb2.GenerateResponse]) -> list[int]:
    return [t for r in responses if r.WhichOneof("response") == "chunk" for t in r.chunk.token_ids]


def test_streams_every_token_then_completes(stack: GatewayStack, stub) -> None:
    stack.fake.batch_size = 3
    out = _generate(stub, text="hi there", stream=True, request_id="client-1")
    chunks, last = out[:-1], out[-1]
    assert all(r.WhichOneof("response") == "chunk" for r in chunks)
    assert _streamed_ids(out) == HELLO
    assert "".join(r.chunk.text for r in chunks) == "Hello, world!"
    assert [r.chunk.completion_tokens for r in chunks] == [3, 6, 9, 12, 13]
    assert all(len(r.chunk.timings) == len(r.chunk.token_ids) for r in chunks)
    assert chunks[0].chunk.prompt_tokens == len("hi there")
    # The gateway makes the id (128 random bits); the client's own id is kept as the label.
    assert last.WhichOneof("response") == "complete" and len(last.request_id) == 32
    assert {r.request_id for r in out} == {last.request_id}
    c = last.complete
    assert list(c.output_ids) == HELLO and c.text == "Hello, world!" and c.finish_reason == "stop"
    assert c.completion_tokens == 13 and c.prompt_tokens == 8 and c.ttft_ms > 0 and c.mean_tbt_ms >= 0
    sub = stack.fake.submits[0]
    assert (sub.request_id, sub.label, sub.tenant) == (last.request_id, "client-1", "")
    assert list(sub.prompt_token_ids) == [3 + b for b in b"hi there"]
    assert sub.app_class == "chat" and sub.slo.tbt_ms == pytest.approx(50) and sub.slo.ttft_ms == pytest.approx(1000)
    assert sub.has_eos_token_id and sub.eos_token_id == 2


def test_the_request_id_comes_before_any_token(stack: GatewayStack, stub) -> None:
    """Sent as initial metadata once the scheduler accepted it: a client whose stream breaks
    before its first chunk can still Attach."""
    stack.reset(hold_at=0)  # accepted, and not one token yet
    call = stub.Generate(gateway_pb2.GenerateRequest(text="hi", stream=True, request_id="early"), timeout=10)
    rid = dict(call.initial_metadata())["x-request-id"]
    assert rid == stack.fake.id_of("early") and len(rid) == 32
    stack.fake.released = True
    assert list(call)[-1].request_id == rid


def test_non_streaming_returns_one_complete(stack: GatewayStack, stub) -> None:
    out = _generate(stub, stream=False)
    assert len(out) == 1 and out[0].complete.text == "Hello, world!" and len(out[0].request_id) == 32


def test_token_input_gets_ids_without_text(stack: GatewayStack, stub) -> None:
    out = _generate(stub, tokenized=common_pb2.TokenizedInput(input_ids=[5, 6, 7]), stream=True)
    assert _streamed_ids(out) == HELLO and out[-1].complete.text == ""
    assert list(stack.fake.submits[0].prompt_token_ids) == [5, 6, 7]


@pytest.mark.parametrize("fields, named", [
    (dict(text=""), "text or tokenized.input_ids"),
    (dict(sampling_params=common_pb2.SamplingParams(temperature=-0.5)), "sampling_params.temperature"),
    (dict(sampling_params=common_pb2.SamplingParams(top_p=1.5)), "sampling_params.top_p"),
    (dict(sampling_params=common_pb2.SamplingParams(top_k=-1)), "sampling_params.top_k"),
    (dict(sampling_params=common_pb2.SamplingParams(max_new_tokens=0)), "sampling_params.max_new_tokens"),
    (dict(app_class="poetry"), "app_class"),
    (dict(slo=common_pb2.SLOSpec(ttft_ms=-1, tbt_ms=50)), "slo.ttft_ms"),
    (dict(slo=common_pb2.SLOSpec(ttft_ms=500)), "slo.tbt_ms"),
    (dict(slo=common_pb2.SLOSpec(tbt_ms=50)), "slo.ttft_ms"),
    (dict(slo=common_pb2.SLOSpec(ttft_ms=500, tbt_ms=1)), "slo.tbt_ms"),
    (dict(slo=common_pb2.SLOSpec(jct_ms=1e12)), "slo.jct_ms"),
    (dict(request_id="bad id!"), "request_id"),
    (dict(text="x" * 64), "64 tokens"),
])
def test_bad_input_is_invalid_argument_naming_the_field(stack: GatewayStack, stub, fields, named) -> None:
    with pytest.raises(grpc.RpcError) as err:
        _generate(stub, **fields)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in err.value.details()
    assert stack.fake.submits == []


def test_prompt_over_context_names_both_numbers(stack: GatewayStack, stub) -> None:
    with pytest.raises(grpc.RpcError) as err:
        _generate(stub, text="x" * 70)
    assert "70 tokens" in err.value.details() and "64 tokens" in err.value.details()


def test_unknown_class_lists_known_ones(stack: GatewayStack, stub) -> None:
    with pytest.raises(grpc.RpcError) as err:
        _generate(stub, app_class="poetry")
    assert "chat, code, summarization, batch" in err.value.details()


@pytest.mark.parametrize("code", [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE,
                                  grpc.StatusCode.INVALID_ARGUMENT])
def test_scheduler_errors_pass_through(stack: GatewayStack, stub, code) -> None:
    stack.fake.submit_error = (code, "queue is full: retry in 2 s")
    with capture_logs() as logs, pytest.raises(grpc.RpcError) as err:
        _generate(stub, stream=True, request_id=f"refused-{code.name}")
    assert err.value.code() == code and err.value.details() == "queue is full: retry in 2 s"
    assert {"event": "submit_failed", "request_id": stack.fake.id_of(f"refused-{code.name}"), "code": code.name,
            "details": "queue is full: retry in 2 s", "log_level": "warning"} in logs


def test_admission_retry_hint_reaches_the_grpc_client(stack: GatewayStack, stub) -> None:
    stack.fake.submit_error = (grpc.StatusCode.RESOURCE_EXHAUSTED, "the SLO of class 'chat' cannot be met now")
    stack.fake.submit_retry_after_ms = 1200
    with pytest.raises(grpc.RpcError) as err:
        _generate(stub, stream=True, request_id="refused-admission")
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ("retry-after-ms", "1200") in tuple(err.value.trailing_metadata())


def test_explicit_slo_and_class_reach_submit(stack: GatewayStack, stub) -> None:
    _generate(stub, app_class="code", slo=common_pb2.SLOSpec(ttft_ms=800, tbt_ms=120))
    _generate(stub, app_class="summarization")
    _generate(stub, slo=common_pb2.SLOSpec(jct_ms=30_000))
    explicit, by_class, jct = stack.fake.submits
    assert (explicit.app_class, explicit.slo.ttft_ms, explicit.slo.tbt_ms) == ("code", 800, 120)
    assert by_class.slo.tbt_ms == pytest.approx(500) and by_class.slo.ttft_ms == pytest.approx(10_000)
    assert jct.app_class == "chat" and jct.slo.jct_ms == 30_000 and jct.slo.tbt_ms == 0


def test_broken_watch_is_resumed_without_loss_or_duplicates(stack: GatewayStack, stub) -> None:
    stack.reset(break_after=5, rewind_on_resume=3, batch_size=2)
    out = _generate(stub, stream=True, request_id="resume-1")
    assert _streamed_ids(out) == HELLO
    assert list(out[-1].complete.output_ids) == HELLO and out[-1].complete.text == "Hello, world!"
    rid = stack.fake.id_of("resume-1")
    assert [w for w in stack.fake.watches if w[0] == rid] == [(rid, 0), (rid, 6)]


def test_scheduler_restart_mid_stream_loses_nothing(stack: GatewayStack, stub) -> None:
    stack.reset(token_delay_s=0.03)
    stream = stub.Generate(gateway_pb2.GenerateRequest(text="hi", stream=True, request_id="restart-1"), timeout=15)
    got = [next(stream), next(stream)]
    stack.restart_scheduler(down_s=0.3)
    got += list(stream)
    assert _streamed_ids(got) == HELLO and got[-1].complete.finish_reason == "stop"
    assert len([w for w in stack.fake.watches if w[0] == stack.fake.id_of("restart-1")]) >= 2


def test_client_disconnect_cancels_at_the_scheduler(stack: GatewayStack, stub) -> None:
    stack.reset(token_delay_s=0.05)
    stream = stub.Generate(gateway_pb2.GenerateRequest(text="hi", stream=True, request_id="gone-1"), timeout=15)
    next(stream)
    stream.cancel()
    assert stack.wait_for(lambda: stack.fake.cancelled("gone-1"))


def test_client_leaving_during_submit_cancels_at_the_scheduler(stack: GatewayStack, stub) -> None:
    stack.reset(submit_delay_s=1.0)
    stream = stub.Generate(gateway_pb2.GenerateRequest(text="hi", stream=True, request_id="gone-early"), timeout=15)
    assert stack.wait_for(lambda: bool(stack.fake.id_of("gone-early")))
    stream.cancel()  # the scheduler has accepted it; its answer has not arrived yet
    assert stack.wait_for(lambda: stack.fake.cancelled("gone-early"))


def test_token_ids_outside_the_workers_vocabulary_are_refused_before_submit() -> None:
    from tests.support.gateway_stack import FakeScheduler

    s = GatewayStack(fake=FakeScheduler(vocab_size=1000))  # its own: ServerInfo is cached per gateway
    try:
        with grpc.insecure_channel(s.grpc_target) as channel, pytest.raises(grpc.RpcError) as exc:
            _generate(gateway_pb2_grpc.GatewayStub(channel), request_id="oov-1",
                      tokenized=common_pb2.TokenizedInput(input_ids=[5, 1000]))
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "input_ids[1] = 1000" in exc.value.details()
        assert not s.fake.submits
    finally:
        s.close()


def test_a_submit_past_its_deadline_is_cancelled_at_the_scheduler() -> None:
    from tests.support.gateway_stack import FakeScheduler

    s = GatewayStack(fake=FakeScheduler(submit_delay_s=1.0), submit_timeout_s=0.2)
    try:
        with grpc.insecure_channel(s.grpc_target) as channel, pytest.raises(grpc.RpcError) as exc:
            _generate(gateway_pb2_grpc.GatewayStub(channel), request_id="slow-submit")
        assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert s.wait_for(lambda: s.fake.cancelled("slow-submit"))  # accepted there, so withdrawn
    finally:
        s.close()


def test_cancel_and_get_request_pass_through(stack: GatewayStack, stub) -> None:
    rid = _generate(stub, request_id="done-1")[-1].request_id
    state = stub.GetRequest(common_pb2.GetRequestRequest(request_id=rid), timeout=5)
    assert list(state.output_ids) == HELLO and state.app_class == "chat" and state.label == "done-1"
    assert stub.Cancel(common_pb2.CancelRequest(request_id=rid), timeout=5).cancelled
    for call, msg in ((stub.GetRequest, common_pb2.GetRequestRequest), (stub.Cancel, common_pb2.CancelRequest)):
        with pytest.raises(grpc.RpcError) as err:
            call(msg(request_id="nope"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in err.value.details()


def test_unreachable_scheduler_is_unavailable() -> None:
    s = GatewayStack()
    try:
        s.loop.run(s._server.stop(0))
        with grpc.insecure_channel(s.grpc_target) as channel, pytest.raises(grpc.RpcError) as err:
            list(gateway_pb2_grpc.GatewayStub(channel).Generate(gateway_pb2.GenerateRequest(text="hi"), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        s.close()


def test_gateway_shutdown_leaves_requests_running() -> None:
    s = GatewayStack(grace_s=0.2)
    try:
        s.reset(token_delay_s=0.1)
        with grpc.insecure_channel(s.grpc_target) as channel:
            stream = gateway_pb2_grpc.GatewayStub(channel).Generate(
                gateway_pb2.GenerateRequest(text="hi", stream=True, request_id="kept-1"), timeout=10)
            next(stream)
            s.loop.run(s.handle.stop())
            with pytest.raises(grpc.RpcError):
                list(stream)
        assert s.fake.submits and not s.wait_for(lambda: s.fake.cancels != [], timeout=0.3)
    finally:
        s.close()


def test_classes_come_from_the_scheduler() -> None:
    """A scheduler configured with its own classes needs no matching gateway configuration."""
    from tests.support.gateway_stack import FakeScheduler

    fake = FakeScheduler(classes={"vision": dict(ttft_ms=2000, tbt_ms=120), "chat": dict(ttft_ms=500, tbt_ms=40)})
    s = GatewayStack(fake=fake)
    try:
        with grpc.insecure_channel(s.grpc_target) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            _generate(stub, app_class="vision")
            _generate(stub)  # the gateway's default class, with the scheduler's SLO for it
            with pytest.raises(grpc.RpcError) as err:
                _generate(stub, app_class="code")  # a default class this scheduler does not have
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "'code' is unknown" in err.value.details() and "vision, chat" in err.value.details()
        vision, chat = fake.submits
        assert (vision.app_class, vision.slo.tbt_ms, vision.slo.ttft_ms) == ("vision", 120, 2000)
        assert (chat.app_class, chat.slo.tbt_ms, chat.slo.ttft_ms) == ("chat", 40, 500)
    finally:
        s.close()


def test_concurrent_requests_share_one_watch_stream(stack: GatewayStack, stub) -> None:
    """Tokens of every request come over one WatchMany stream, not one Watch per request."""
    import concurrent.futures as cf

    stack.reset(token_delay_s=0.01, batch_size=2)
    with cf.ThreadPoolExecutor(max_workers=8) as pool:
        outs = list(pool.map(lambda i: _generate(stub, stream=True, request_id=f"many-{i}"), range(8)))
    assert all(_streamed_ids(out) == HELLO for out in outs)
    watched = sorted(rid for m in stack.fake.watch_many_messages for rid in (w.request_id for w in m.watch))
    assert watched == sorted(out[-1].request_id for out in outs)
    assert stack.fake.watch_many_streams <= 1  # the stream opened by an earlier test may still serve


def test_abandoned_request_is_unwatched(stack: GatewayStack, stub) -> None:
    stack.reset(token_delay_s=0.05)
    stream = stub.Generate(gateway_pb2.GenerateRequest(text="hi", stream=True, request_id="left-1"), timeout=15)
    next(stream)
    stream.cancel()
    assert stack.wait_for(lambda: any(stack.fake.id_of("left-1") in m.unwatch
                                      for m in stack.fake.watch_many_messages))


def test_a_second_watcher_of_a_request_gets_a_stream_of_its_own(stack: GatewayStack) -> None:
    """The shared stream carries one start index per request: a second watch of a request already
    on it goes over another WatchMany stream, and both watchers see every token."""
    import asyncio

    from accelgen.v1 import scheduler_pb2
    from gateway.scheduler_client import SchedulerClient

    stack.reset(token_delay_s=0.01, batch_size=4)

    async def scenario() -> tuple[list[list[int]], int]:
        client = SchedulerClient(stack.config)
        try:
            await client.submit(scheduler_pb2.SubmitRequest(request_id="twice-1", prompt_token_ids=[5, 6]))

            async def collect() -> list[int]:
                return [t async for batch in client.watch("twice-1") for t in batch.token_ids]

            outputs = await asyncio.gather(collect(), collect())
            return list(outputs), stack.fake.watch_many_streams
        finally:
            await client.close()

    outputs, streams = stack.loop.run(scenario())
    assert outputs == [HELLO, HELLO] and streams == 2
    assert [w for w in stack.fake.watches if w[0] == "twice-1"] == [("twice-1", 0), ("twice-1", 0)]


def test_unreachable_scheduler_is_unavailable_not_an_unknown_class() -> None:
    """Before the gateway has seen the scheduler's classes it cannot call a class unknown."""
    from tests.support.gateway_stack import FakeScheduler

    s = GatewayStack(fake=FakeScheduler(classes={"vision": dict(ttft_ms=2000, tbt_ms=120)}))
    try:
        s.loop.run(s._server.stop(0))
        with grpc.insecure_channel(s.grpc_target) as channel, pytest.raises(grpc.RpcError) as err:
            _generate(gateway_pb2_grpc.GatewayStub(channel), app_class="vision")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        s.close()


def test_closed_client_ends_streams_and_opens_no_new_one(stack: GatewayStack) -> None:
    from accelgen.v1 import scheduler_pb2
    from gateway.errors import GatewayError
    from gateway.scheduler_client import SchedulerClient

    stack.reset(token_delay_s=0.05)

    async def scenario() -> tuple[str, int]:
        client = SchedulerClient(stack.config)
        await client.submit(scheduler_pb2.SubmitRequest(request_id="closing-1", prompt_token_ids=[5, 6]))
        stream = client.watch("closing-1")
        await stream.__anext__()
        await client.close()
        try:
            await stream.__anext__()
        except GatewayError as exc:
            return exc.code.name, stack.fake.watch_many_streams
        return "no error", stack.fake.watch_many_streams

    code, streams = stack.loop.run(scenario())
    assert code == "UNAVAILABLE" and streams == 1
