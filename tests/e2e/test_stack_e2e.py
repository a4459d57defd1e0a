"""The whole stack as processes: real redis-server, scheduler, sim workers and gateway over loopback.

The sim workers run at a small time scale so iterations take milliseconds; what is tested is
the distributed behaviour: streaming, concurrency, crash recovery and error codes.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import time
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import grpc
import pytest

from launcher.stack import Stack, start_redis, start_scheduler_proc, start_stack
from accelgen.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

pytestmark = pytest.mark.e2e

FAST = ["--time-scale", "0.02"]
LONG = 1500  # output tokens: long enough that a kill lands mid-generation
SCHED = ["--heartbeat-interval-s", "0.5", "--heartbeat-ttl-s", "2", "--lease-ttl-s", "2", "--log-level", "WARNING"]


def make_stack(tmp_path: Path, workers: int = 2, scheduler_args: list[str] | None = None) -> Stack:
    return start_stack(workers=workers, executor="sim", worker_args=FAST + ["--log-level", "WARNING"],
                       scheduler_args=SCHED + (scheduler_args or []), gateway_args=["--log-level", "WARNING"],
                       log_dir=tmp_path)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    s = make_stack(tmp_path_factory.mktemp("stack"))
    yield s
    s.stop()


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.05)


def server_info(scheduler_address: str) -> scheduler_pb2.ServerInfo:
    with grpc.insecure_channel(scheduler_address) as ch:
        return scheduler_pb2_grpc.SchedulerStub(ch).GetServerInfo(scheduler_pb2.GetServerInfoRequest(), timeout=5)


def generating(scheduler_address: str, requests: int) -> Callable[[], bool]:
    """True once the scheduler holds ``requests`` unfinished requests and has run iterations."""

    def check() -> bool:
        info = server_info(scheduler_address)
        return info.queued_requests >= requests and info.iterations > 20

    return check


def generate(address: str, max_tokens: int, prompt_len: int = 40, app_class: str = "chat", request_id: str = "",
             timeout: float = 120.0, ids: list[str] | None = None,
             **slo: float) -> tuple[list[int], gateway_pb2.GenerateComplete]:
    """One streamed request; ``request_id`` is the client's label, and the id the gateway made
    is appended to ``ids`` as soon as the first answer names it."""
    req = gateway_pb2.GenerateRequest(
        request_id=request_id, tokenized=common_pb2.TokenizedInput(input_ids=[7] * prompt_len),
        sampling_params=common_pb2.SamplingParams(max_new_tokens=max_tokens, ignore_eos=True),
        app_class=app_class, stream=True)
    if slo:
        req.slo.CopyFrom(common_pb2.SLOSpec(**slo))
    tokens: list[int] = []
    complete = None
    with grpc.insecure_channel(address) as ch:
        for resp in gateway_pb2_grpc.GatewayStub(ch).Generate(req, timeout=timeout):
            if ids is not None and not ids:
                ids.append(resp.request_id)
            if resp.HasField("chunk"):
                tokens.extend(resp.chunk.token_ids)
            else:
                complete = resp.complete
    assert complete is not None, "stream ended without GenerateComplete"
    return tokens, complete


def test_one_request_streams_all_its_tokens(stack: Stack) -> None:
    tokens, done = generate(stack.gateway_address, max_tokens=25)
    assert len(tokens) == 25
    assert list(done.output_ids) == tokens
    assert done.finish_reason == "length" and done.completion_tokens == 25


def test_200_concurrent_mixed_slo_requests_complete(stack: Stack) -> None:
    classes = ["chat", "code", "summarization"]
    jobs = [(10 + (i * 7) % 40, 20 + (i * 13) % 200, classes[i % 3]) for i in range(200)]
    with cf.ThreadPoolExecutor(max_workers=64) as pool:
        futures = [pool.submit(generate, stack.gateway_address, n, p, c) for n, p, c in jobs]
        results = [f.result(timeout=300) for f in futures]
    assert [len(t) for t, _ in results] == [n for n, _, _ in jobs]
    # The scheduler timed each hop of those tokens after the model, in order along the path.
    info = server_info(stack.scheduler_address)
    hops = [info.worker_to_scheduler, info.applied_to_durable, info.applied_to_gateway]
    assert all(h.samples > 0 and 0 < h.p50_ms <= h.p99_ms < 60_000 for h in hops), hops


def test_openai_client_streams_a_completion(stack: Stack) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{stack.http_port}/v1", api_key="unused")
    model = client.models.list().data[0].id
    # Long enough (200 iterations, each a Redis round trip) that the tokens cannot all arrive
    # before the first chunk is flushed, however the machine is loaded.
    pieces = list(client.completions.create(model=model, prompt="hello there", max_tokens=200, stream=True,
                                            extra_body={"ignore_eos": True, "app_class": "code"}))
    assert len(pieces) >= 2
    assert pieces[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("request_fields, code, fragment", [
    ({"max_tokens": 5, "prompt_len": 0}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ({"max_tokens": 5, "prompt_len": 5000}, grpc.StatusCode.INVALID_ARGUMENT, "context"),
    ({"max_tokens": 5, "app_class": "nope"}, grpc.StatusCode.INVALID_ARGUMENT, "app_class"),
    ({"max_tokens": 5, "ttft_ms": 1000, "tbt_ms": 0.5}, grpc.StatusCode.INVALID_ARGUMENT, "tbt_ms"),
    ({"max_tokens": 5, "ttft_ms": 1000, "tbt_ms": 10}, grpc.StatusCode.FAILED_PRECONDITION, "cannot be met"),
])
def test_errors_have_codes_and_leave_other_requests_intact(stack: Stack, request_fields: dict, code: grpc.StatusCode,
                                                           fragment: str) -> None:
    with cf.ThreadPoolExecutor(max_workers=8) as pool:
        good = [pool.submit(generate, stack.gateway_address, 60) for _ in range(8)]
        fields = dict(request_fields)
        with pytest.raises(grpc.RpcError) as exc:
            generate(stack.gateway_address, fields.pop("max_tokens"), fields.pop("prompt_len", 40),
                     fields.pop("app_class", "chat"), **fields)
        assert exc.value.code() == code
        assert fragment in exc.value.details().lower()
        assert [len(f.result(timeout=120)[0]) for f in good] == [60] * 8


def test_scheduler_killed_and_restarted_loses_no_request(tmp_path: Path) -> None:
    s = make_stack(tmp_path)
    try:
        with cf.ThreadPoolExecutor(max_workers=30) as pool:
            futures = [pool.submit(generate, s.gateway_address, LONG, 30, timeout=240) for _ in range(30)]
            wait_until(generating(s.scheduler_address, 30), "all 30 requests to be generating")  # mid-load
            sched = s.find("scheduler")
            sched.kill()  # SIGKILL: no clean shutdown, lease left in Redis
            port = int(s.scheduler_address.rsplit(":", 1)[1])
            s.procs.append(start_scheduler_proc(s, port, SCHED, name="scheduler-2"))
            lengths = [len(f.result(timeout=240)[0]) for f in futures]
        assert lengths == [LONG] * 30
    finally:
        s.stop()


def test_killed_worker_has_its_requests_finished_by_another(tmp_path: Path) -> None:
    s = make_stack(tmp_path, workers=2)
    try:
        with cf.ThreadPoolExecutor(max_workers=20) as pool:
            futures = [pool.submit(generate, s.gateway_address, LONG, 30, timeout=240) for _ in range(20)]
            wait_until(generating(s.scheduler_address, 20), "all 20 requests to be generating")
            s.find("worker-0").kill()
            lengths = [len(f.result(timeout=240)[0]) for f in futures]
        assert lengths == [LONG] * 20
    finally:
        s.stop()


def test_no_worker_is_unavailable(tmp_path: Path) -> None:
    s = make_stack(tmp_path, workers=1)
    try:
        s.find("worker-0").stop()  # SIGTERM: deregisters
        wait_until(lambda: server_info(s.scheduler_address).live_workers == 0, "the worker to deregister")
        with pytest.raises(grpc.RpcError) as exc:
            generate(s.gateway_address, 5)
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "worker" in exc.value.details().lower()
    finally:
        s.stop()


def test_redis_outage_is_unavailable_and_keeps_the_workers(tmp_path: Path) -> None:
    # An outage within the lease: the leader serves on from memory. (One longer than the lease ends
    # the leader with status 3, to come back as a standby: tests/integration/test_leadership.py.)
    s = make_stack(tmp_path, workers=1, scheduler_args=["--lease-ttl-s", "60"])
    try:
        redis_port = urlsplit(s.redis_url).port
        ids: list[str] = []
        with cf.ThreadPoolExecutor(max_workers=1) as pool:
            running = pool.submit(generate, s.gateway_address, LONG, request_id="outage-long", timeout=60, ids=ids)
            wait_until(generating(s.scheduler_address, 1), "the request to be generating")
            wait_until(lambda: bool(ids), "its first tokens (and its id) at the client")
            rid = ids[0]
            s.find("redis").kill()
            time.sleep(1.5)  # not a wait for an event: three heartbeats (0.5 s) land while Redis is down
            info = server_info(s.scheduler_address)
            assert info.live_workers == 1, "a Redis outage must not drop the workers"
            with pytest.raises(grpc.RpcError) as exc:
                generate(s.gateway_address, 5, timeout=30)
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "redis" in exc.value.details().lower()
            # A cancel during the outage takes effect at once; only its record waits for Redis.
            with grpc.insecure_channel(s.gateway_address) as ch:
                cancelled = gateway_pb2_grpc.GatewayStub(ch).Cancel(common_pb2.CancelRequest(request_id=rid),
                                                                   timeout=10)
            assert cancelled.cancelled
            tokens, complete = running.result(timeout=30)
            assert complete.finish_reason == "abort" and len(tokens) < LONG
        # Redis back (empty, on the same port): the same worker serves again.
        proc, _ = start_redis(port=redis_port, log_dir=tmp_path, password=urlsplit(s.redis_url).password)
        s.procs[0] = proc
        tokens, complete = generate(s.gateway_address, 5, timeout=60)
        assert len(tokens) == 5 and complete.finish_reason == "length"
        import redis

        client = redis.Redis.from_url(s.redis_url)
        # The deferred cancel record lands once Redis answers.
        wait_until(lambda: client.hget(f"accelgen:req:{rid}", "status") == b"cancelled",
                   "the cancel record", timeout_s=10)
        client.close()
        with grpc.insecure_channel(s.gateway_address) as ch, pytest.raises(grpc.RpcError) as exc:
            gateway_pb2_grpc.GatewayStub(ch).GetRequest(common_pb2.GetRequestRequest(request_id=rid),
                                                        timeout=10)
        # Redis came back empty, so the request's record is gone: a clear NOT_FOUND, not INTERNAL.
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        s.stop()


def test_queue_full_is_resource_exhausted(tmp_path: Path) -> None:
    s = make_stack(tmp_path, workers=1, scheduler_args=["--max-queue", "3"])
    try:
        with cf.ThreadPoolExecutor(max_workers=3) as pool:
            running = [pool.submit(generate, s.gateway_address, LONG, 30) for _ in range(3)]
            wait_until(lambda: server_info(s.scheduler_address).queued_requests == 3, "the queue to be full")
            with pytest.raises(grpc.RpcError) as exc:
                generate(s.gateway_address, 5)
            assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue" in exc.value.details().lower()
            assert [len(f.result(timeout=120)[0]) for f in running] == [LONG] * 3
    finally:
        s.stop()



def test_scheduler_classes_need_no_gateway_configuration(tmp_path: Path) -> None:
    classes = {"vision": {"ttft_ms": 2000, "tbt_ms": 120}, "chat": {"ttft_ms": 1000, "tbt_ms": 50}}
    config = tmp_path / "scheduler.json"
    config.write_text(json.dumps({"classes": classes}))
    s = make_stack(tmp_path, workers=1, scheduler_args=["--config", str(config)])
    try:
        ids: list[str] = []
        tokens, _ = generate(s.gateway_address, 5, app_class="vision", request_id="vision-1", ids=ids)
        assert len(tokens) == 5
        with grpc.insecure_channel(s.gateway_address) as ch:
            state = gateway_pb2_grpc.GatewayStub(ch).GetRequest(common_pb2.GetRequestRequest(request_id=ids[0]),
                                                                timeout=10)
        assert state.app_class == "vision" and state.slo.tbt_ms == 120 and state.slo.ttft_ms == 2000
        with pytest.raises(grpc.RpcError) as exc:
            generate(s.gateway_address, 5, app_class="summarization")  # a default class, not this scheduler's
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "vision, chat" in exc.value.details()
    finally:
        s.stop()


def test_watch_many_multiplexes_requests_and_reports_errors_per_request(stack: Stack) -> None:
    ids = [f"wm-{i}" for i in range(3)]
    with grpc.insecure_channel(stack.scheduler_address) as ch:
        sched = scheduler_pb2_grpc.SchedulerStub(ch)
        for rid in ids:  # straight to the scheduler: nothing else watches them
            sched.Submit(scheduler_pb2.SubmitRequest(
                request_id=rid, prompt_token_ids=[7] * 20, app_class="chat",
                sampling_params=common_pb2.SamplingParams(max_new_tokens=30, ignore_eos=True)), timeout=10)
        watch = scheduler_pb2.WatchManyRequest(watch=[scheduler_pb2.WatchRequest(request_id=r) for r in ids + ["nope"]])
        got: dict[str, list[int]] = {r: [] for r in ids}
        finished, errors, messages = set(), {}, 0
        for resp in sched.WatchMany(iter([watch]), timeout=60):  # ends once all it watches finished
            messages += 1
            for b in resp.batches:
                assert b.start_index == len(got[b.request_id])
                got[b.request_id].extend(b.token_ids)
                if b.finished:
                    finished.add(b.request_id)
            errors.update({e.request_id: e for e in resp.errors})
        assert finished == set(ids) and all(len(tokens) == 30 for tokens in got.values())
        assert errors["nope"].code == grpc.StatusCode.NOT_FOUND.value[0] and "nope" in errors["nope"].message
        # Two workers, so two lanes: about one message per iteration of each (<= 60), where one
        # Watch per request would send one per token of each (90).
        assert messages <= 2 * 30 + 5
        again = scheduler_pb2.WatchManyRequest(watch=[scheduler_pb2.WatchRequest(request_id="wm-0", start_index=25)])
        tail = [b for resp in sched.WatchMany(iter([again]), timeout=10) for b in resp.batches]
    assert len(tail) == 1 and tail[0].finished and list(tail[0].token_ids) == got["wm-0"][25:]
