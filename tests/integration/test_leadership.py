"""Scheduler leadership with real processes, a real Redis and real signals: a standby takes over
from a killed or stalled leader, a deposed leader writes nothing and exits with status 3, and the
store's lease and fencing hold at the Redis level.

The takeover time measured here (leader lost -> standby SERVING) is printed; with
``--lease-ttl-s 2`` it is about the TTL plus a poll and the recovery.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Callable, Iterator

import grpc
import pytest
import redis

from accelgen.common.grpc_server import free_port
from accelgen.core.request import Request, RequestStatus, SamplingParams
from accelgen.core.slo import SLO
from accelgen.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from launcher.stack import Proc, python_module, spawn, start_redis, wait_healthy
from scheduler_service.state.store import IterationChanges, LeaseLost, RedisStore
from worker_service.executors.sim import sim_token

pytestmark = pytest.mark.integration

SERVICE = "accelgen.v1.Scheduler"
LEASE_TTL_S = 2.0
MAX_TOKENS = 120


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    proc, url = start_redis(workdir=tmp_path, key_prefix=None)  # several prefixes, KEYS, DUMP, FLUSHALL
    yield url
    proc.stop()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in reversed(started):
        if proc.alive():
            try:
                os.killpg(proc.popen.pid, signal.SIGCONT)  # a stopped process cannot handle SIGTERM
            except ProcessLookupError:
                pass
            proc.stop(grace_s=5)


def _until(predicate: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _scheduler(procs: list[Proc], name: str, port: int, url: str, log_dir: Path) -> Proc:
    proc = spawn(name, python_module("scheduler_service.main", "--port", str(port), "--redis-url", url,
                                     "--lease-ttl-s", str(LEASE_TTL_S), "--instance-id", name,
                                     "--heartbeat-ttl-s", "10"), log_dir)
    procs.append(proc)
    return proc


def _standby_logged(proc: Proc) -> bool:
    return proc.log_path is not None and proc.log_path.exists() and "standby" in proc.log_path.read_text()


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _leader_and_standby(procs: list[Proc], url: str, log_dir: Path) -> tuple[Proc, int, Proc, int]:
    """Scheduler a (the leader, SERVING), scheduler b (a standby: alive, not listening), and a sim
    worker given both addresses."""
    pa, pb = free_port(), free_port()
    a = _scheduler(procs, "sched-a", pa, url, log_dir)
    wait_healthy(f"127.0.0.1:{pa}", SERVICE, timeout_s=30, proc=a)
    b = _scheduler(procs, "sched-b", pb, url, log_dir)
    _until(lambda: _standby_logged(b), "the second scheduler to wait as a standby")
    assert b.alive() and not _listening(pb), "a standby must not listen before it holds the lease"
    worker = spawn("w0", python_module("worker_service.main", "--scheduler", f"127.0.0.1:{pa},127.0.0.1:{pb}",
                                       "--worker-id", "w0", "--executor", "sim"), log_dir)
    procs.append(worker)
    with grpc.insecure_channel(f"127.0.0.1:{pa}") as ch:
        stub = scheduler_pb2_grpc.SchedulerStub(ch)
        _until(lambda: stub.GetServerInfo(scheduler_pb2.GetServerInfoRequest(), timeout=5).live_workers >= 1,
               "the worker to register with the leader", timeout_s=60)
    return a, pa, b, pb


def _submit(address: str, ids: list[str]) -> None:
    with grpc.insecure_channel(address) as ch:
        stub = scheduler_pb2_grpc.SchedulerStub(ch)
        for rid in ids:
            stub.Submit(scheduler_pb2.SubmitRequest(
                request_id=rid, prompt_token_ids=[7] * 30, app_class="batch",
                sampling_params=common_pb2.SamplingParams(max_new_tokens=MAX_TOKENS, ignore_eos=True)), timeout=10)


def _outputs(url: str, ids: list[str]) -> dict[str, tuple[str, list[int]]]:
    """(status, output ids) of each request, read from Redis."""
    client = redis.Redis.from_url(url)
    try:
        out = {}
        for rid in ids:
            status = client.hget(f"accelgen:req:{rid}", "status")
            raw = client.get(f"accelgen:out:{rid}") or b""
            out[rid] = ((status or b"").decode(), [int.from_bytes(raw[i:i + 4], "little")
                                                   for i in range(0, len(raw), 4)])
        return out
    finally:
        client.close()


def _all_finished(url: str, ids: list[str]) -> bool:
    return all(status == "finished" for status, _ in _outputs(url, ids).values())


def _expected(rid: str) -> list[int]:
    return [sim_token(rid, i) for i in range(MAX_TOKENS)]


def _holder(url: str) -> tuple[str, int]:
    """(instance, fence) of the scheduler holding the lease."""
    client = redis.Redis.from_url(url)
    try:
        instance, _, fence = (client.get("accelgen:leader") or b":0").decode().rpartition(":")
        return instance, int(fence)
    finally:
        client.close()


def _takeover(b_port: int, b: Proc, lost_at: float) -> float:
    wait_healthy(f"127.0.0.1:{b_port}", SERVICE, timeout_s=30, proc=b)
    return time.monotonic() - lost_at


def test_a_standby_serves_within_10_s_of_the_leader_being_killed(redis_url: str, procs: list[Proc],
                                                                  tmp_path: Path) -> None:
    a, pa, b, pb = _leader_and_standby(procs, redis_url, tmp_path)
    ids = [f"k{i}" for i in range(4)]
    _submit(f"127.0.0.1:{pa}", ids)
    _until(lambda: all(len(toks) >= 5 for _, toks in _outputs(redis_url, ids).values()), "first tokens")
    a.kill()  # kill -9: no clean shutdown, the lease is left to expire
    lost_at = time.monotonic()
    took = _takeover(pb, b, lost_at)
    print(f"\ntakeover after kill -9 of the leader: {took:.2f} s (lease_ttl_s = {LEASE_TTL_S:g})")
    assert took < 10.0
    # The worker carries on under the new leader: every accepted request finishes, each token once.
    _until(lambda: _all_finished(redis_url, ids), "the requests to finish under the new leader", timeout_s=60)
    for rid, (_status, tokens) in _outputs(redis_url, ids).items():
        assert tokens == _expected(rid), rid
    with grpc.insecure_channel(f"127.0.0.1:{pb}") as ch:
        info = scheduler_pb2_grpc.SchedulerStub(ch).GetServerInfo(scheduler_pb2.GetServerInfoRequest(), timeout=5)
        assert info.live_workers == 1
    assert _holder(redis_url)[0] == "sched-b"


def test_a_leader_stalled_past_its_lease_is_deposed_writes_nothing_and_exits_3(redis_url: str, procs: list[Proc],
                                                                               tmp_path: Path) -> None:
    a, pa, b, pb = _leader_and_standby(procs, redis_url, tmp_path)
    ids = [f"s{i}" for i in range(4)]
    _submit(f"127.0.0.1:{pa}", ids)
    _until(lambda: all(len(toks) >= 5 for _, toks in _outputs(redis_url, ids).values()), "first tokens")
    with grpc.insecure_channel(f"127.0.0.1:{pa}") as to_a:
        stub_a = scheduler_pb2_grpc.SchedulerStub(to_a)
        grpc.channel_ready_future(to_a).result(timeout=5)  # connected before the stall
        _, fence_a = _holder(redis_url)
        os.killpg(a.popen.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        took = _takeover(pb, b, stopped_at)
        print(f"\ntakeover from a SIGSTOPped leader: {took:.2f} s (lease_ttl_s = {LEASE_TTL_S:g})")
        assert took < 10.0
        # A Submit sent to the stalled leader: its kernel takes the bytes; it reads them on SIGCONT.
        late = stub_a.Submit.future(scheduler_pb2.SubmitRequest(
            request_id="late", prompt_token_ids=[7] * 30, app_class="batch",
            sampling_params=common_pb2.SamplingParams(max_new_tokens=4)), timeout=20)
        time.sleep(0.3)  # let the request reach the stalled process's socket (not a synchronisation)
        os.killpg(a.popen.pid, signal.SIGCONT)
        a.popen.wait(timeout=20)
        assert a.popen.returncode == 3, f"a deposed scheduler exits with status 3, got {a.popen.returncode}"
        with pytest.raises(grpc.RpcError) as refused:
            late.result()
        assert refused.value.code() != grpc.StatusCode.OK
    log = a.log_path.read_text() if a.log_path else ""
    assert "lease_lost" in log
    client = redis.Redis.from_url(redis_url)
    assert not client.exists("accelgen:req:late"), "a deposed leader's Submit must write nothing"
    holder, fence = _holder(redis_url)
    assert holder == "sched-b" and fence > fence_a
    # Everything finishes under the new leader, each token once: the old leader's late commits
    # (an iteration in flight when it stalled) were refused by the fence, not appended.
    _until(lambda: _all_finished(redis_url, ids), "the requests to finish under the new leader", timeout_s=60)
    for rid, (_status, tokens) in _outputs(redis_url, ids).items():
        assert tokens == _expected(rid), rid
    client.close()


def _health(address: str, service: str) -> str:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
        except grpc.RpcError as exc:
            return exc.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_a_leader_cut_off_from_redis_is_not_ready_then_exits_3_once_its_lease_may_be_gone(
        tmp_path: Path, procs: list[Proc]) -> None:
    redis_proc, url = start_redis(workdir=tmp_path)
    procs.append(redis_proc)
    port = free_port()
    leader = _scheduler(procs, "sched-a", port, url, tmp_path)
    address = f"127.0.0.1:{port}"
    wait_healthy(address, SERVICE, timeout_s=30, proc=leader)
    redis_proc.kill()
    cut_at = time.monotonic()
    _until(lambda: _health(address, SERVICE) != "SERVING", "readiness to drop while Redis is unreachable",
           timeout_s=LEASE_TTL_S)
    assert _health(address, "liveness") == "SERVING" or not leader.alive()
    leader.popen.wait(timeout=20)
    print(f"\ndeposed {time.monotonic() - cut_at:.2f} s after Redis went away (lease_ttl_s = {LEASE_TTL_S:g})")
    assert leader.popen.returncode == 3
    # Not at once: it serves from memory while its lease may still be valid (>= 2/3 of it is left
    # right after a renewal, made every lease_ttl_s / 3).
    assert time.monotonic() - cut_at >= LEASE_TTL_S / 2


def test_a_scheduler_started_without_redis_waits_for_it(tmp_path: Path, procs: list[Proc]) -> None:
    redis_port, port = free_port(), free_port()
    url = f"redis://accelgen:late-redis-password@127.0.0.1:{redis_port}/0"  # the credentials it will have
    scheduler = _scheduler(procs, "sched-a", port, url, tmp_path)
    _until(lambda: scheduler.log_path is not None and scheduler.log_path.exists()
           and "lease_acquire_failed" in scheduler.log_path.read_text(), "the scheduler to retry Redis")
    assert scheduler.alive() and not _listening(port)
    redis_proc, _ = start_redis(port=redis_port, workdir=tmp_path, password="late-redis-password")
    procs.insert(0, redis_proc)  # stopped last
    wait_healthy(f"127.0.0.1:{port}", SERVICE, timeout_s=30, proc=scheduler)


# -- the store, against Redis directly ---------------------------------------------------------
def _request(rid: str) -> Request:
    return Request(request_id=rid, prompt_token_ids=[5, 6, 7], sampling=SamplingParams(max_tokens=4),
                   slo=SLO(ttft_s=1.0, tbt_s=0.1), app_class="chat", arrival_s=1.0)


def test_after_another_scheduler_takes_the_lease_fenced_writes_change_nothing(redis_url: str) -> None:
    async def scenario() -> None:
        old, new = RedisStore(redis_url, prefix="fence:"), RedisStore(redis_url, prefix="fence:")
        lost: list[str] = []
        old.on_lease_lost = lost.append
        first = await old.acquire_lease("old", 300)
        assert first is not None and first >= time.time() * 1000 - 60_000  # never below Redis's clock (ms)
        assert await new.acquire_lease("new", 300) is None  # held
        assert old.lease_value == f"old:{first}" and old.fence == first
        await old.add_request(_request("r1"), "w0")
        await old.commit_iteration(IterationChanges(worker_id="w0", tokens={"r1": ([11], [2.0])},
                                                    status={"r1": (RequestStatus.RUNNING, "")}))
        before = {key: await old.redis.dump(key) for key in await old.redis.keys("fence:*")
                  if not key.endswith((b"leader", b"fence"))}
        while await old.redis.exists("fence:leader"):  # the old leader stalls past its lease
            await asyncio.sleep(0.02)
        second = await new.acquire_lease("new", 60_000)
        assert second is not None and second > first
        # A non-holder's renewal: False, and the holder's TTL is not extended.
        ttl_before = await new.redis.pttl("fence:leader")
        assert await old.renew_lease(600_000) is False
        assert await new.redis.pttl("fence:leader") <= ttl_before
        with pytest.raises(LeaseLost):
            await old.commit_iteration(IterationChanges(
                worker_id="w0", tokens={"r1": ([12, 13], [3.0, 4.0])},
                status={"r1": (RequestStatus.FINISHED, "length")}, preemptions={"r1": 1}, finished=["r1"]))
        with pytest.raises(LeaseLost):
            await old.add_request(_request("r2"), "w0")
        with pytest.raises(LeaseLost):
            await old.add_request(_request("r1"), "w0")  # a reused id: the old record must stay
        after = {key: await old.redis.dump(key) for key in await old.redis.keys("fence:*")
                 if not key.endswith((b"leader", b"fence"))}
        assert after == before, "a deposed store must change nothing"
        assert await old.redis.ttl("fence:req:r1") == -1
        assert len(lost) == 3 and f"lost the leader lease (old:{first})" in lost[0]
        await old.release_lease()  # compare-and-delete: not ours, nothing happens
        assert await new.redis.get("fence:leader") == f"new:{second}".encode()
        # The new leader writes, fenced by its own value.
        await new.commit_iteration(IterationChanges(worker_id="w1", tokens={"r1": ([21], [5.0])},
                                                    status={"r1": (RequestStatus.FINISHED, "length")},
                                                    finished=["r1"]))
        rec = await new.load_request("r1")
        assert rec is not None and rec.request.output_token_ids == [11, 21]
        assert rec.request.status == RequestStatus.FINISHED and "r1" not in await new.redis.zrange("fence:live", 0, -1)
        assert await new.renew_lease(60_000) is True
        await new.release_lease()
        assert not await new.redis.exists("fence:leader")
        await old.close()
        await new.close()

    asyncio.run(scenario())


def test_a_lease_that_expired_untaken_is_taken_back_with_the_same_fence(redis_url: str) -> None:
    async def scenario() -> None:
        store = RedisStore(redis_url, prefix="reclaim:")
        first = await store.acquire_lease("a", 100)
        held = f"a:{first}".encode()
        while await store.redis.exists("reclaim:leader"):  # a stall (or a Redis reload) past the TTL
            await asyncio.sleep(0.02)
        # Nobody else led meanwhile (the fence has not moved): the renewal takes it back.
        assert await store.renew_lease(5_000) is True and await store.redis.get("reclaim:leader") == held
        assert 0 < await store.redis.pttl("reclaim:leader") <= 5_000
        await store.redis.delete("reclaim:leader")  # gone again (say Redis reloaded without it)
        await store.add_request(_request("r1"), "w0")  # so does a fenced write
        assert await store.redis.get("reclaim:leader") == held and await store.load_request("r1") is not None
        # The same instance id restarted (kill -9, then systemd): it takes over at once, newly fenced.
        again = RedisStore(redis_url, prefix="reclaim:")
        second = await again.acquire_lease("a", 5_000)
        assert second is not None and second > first
        assert await store.renew_lease(5_000) is False
        # Redis restarted empty (no persistence): nobody else can have led since; the holder takes
        # its lease back with its fence, and the next leader's fence is still higher.
        await again.redis.flushall()
        assert await again.renew_lease(200) is True and await again.redis.get("reclaim:fence") == str(second).encode()
        while await again.redis.exists("reclaim:leader"):
            await asyncio.sleep(0.02)
        third = await store.acquire_lease("b", 5_000)
        assert third is not None and third > second
        await store.close()
        await again.close()

    asyncio.run(scenario())
