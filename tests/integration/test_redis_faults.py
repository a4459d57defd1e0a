"""RedisStore against real redis-server processes that fail: kill -9 and restart (AOF on), a
Sentinel failover, a malformed record in ``live``, replicas confirming a Submit (WAIT)."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest
import redis

from accelgen.common.grpc_server import free_port
from accelgen.core.request import Request, SamplingParams
from accelgen.core.slo import SLO
from launcher.stack import Proc, spawn, wait_redis
from scheduler_service.state.redis_conn import NotReplicated, durability
from scheduler_service.state.store import RedisStore

pytestmark = pytest.mark.integration

REDIS = shutil.which("redis-server") or "redis-server"


def _redis(port: int, workdir: Path, *args: str, sentinel_conf: Path | None = None) -> Proc:
    """A redis-server (or, with ``sentinel_conf``, a sentinel) on ``port``, answering PING."""
    workdir.mkdir(parents=True, exist_ok=True)
    if sentinel_conf is not None:
        argv = [REDIS, str(sentinel_conf), "--sentinel"]
    else:
        argv = [REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(workdir), *args]
    proc = spawn(f"redis-{port}", argv, workdir)
    if not wait_redis(port, proc=proc):
        raise RuntimeError(f"redis on {port} did not start: {(workdir / f'redis-{port}.log').read_text()}")
    return proc


def _request(rid: str) -> Request:
    return Request(request_id=rid, prompt_token_ids=[5, 6, 7], sampling=SamplingParams(max_tokens=4),
                   slo=SLO(ttft_s=1.0, tbt_s=0.1), app_class="chat", arrival_s=time.time())


async def _until(predicate, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def test_a_killed_and_restarted_redis_is_a_pause_not_an_error(tmp_path: Path) -> None:
    port = free_port()
    aof = ("--appendonly", "yes", "--appendfsync", "always")
    procs = [_redis(port, tmp_path, *aof)]

    async def scenario() -> None:
        store = RedisStore(f"redis://127.0.0.1:{port}/0", prefix="k:")
        report = await durability(store.redis, sentinel=False, min_replicas=0)
        assert report["survives_redis_kill"] == "yes" and report["survives_machine_crash"] == "yes"
        # Several pooled connections, all of which the kill leaves dead.
        await asyncio.gather(*(store.add_request(_request(f"a{i}"), "w0") for i in range(20)))
        procs[0].kill()
        procs.append(await asyncio.to_thread(_redis, port, tmp_path, *aof))
        # The first calls after Redis is back succeed: no UNAVAILABLE from a stale connection.
        await asyncio.gather(*(store.add_request(_request(f"b{i}"), "w0") for i in range(20)))
        assert len(await store.load_live()) == 40, "records written before the kill are there"

        # A call made while Redis is down waits for it (up to redis_retry_s) instead of failing.
        patient = RedisStore(f"redis://127.0.0.1:{port}/0", prefix="k:", retry_s=15.0)
        await patient.add_request(_request("c0"), "w0")
        procs[-1].kill()
        during = asyncio.create_task(patient.add_request(_request("c1"), "w0"))
        await asyncio.sleep(0.3)
        assert not during.done()
        procs.append(await asyncio.to_thread(_redis, port, tmp_path, *aof))
        await asyncio.wait_for(during, timeout=20)
        assert {r.request.request_id for r in await store.load_live()} >= {"a0", "b19", "c0", "c1"}
        await store.close()
        await patient.close()

    try:
        asyncio.run(scenario())
    finally:
        for p in procs:
            p.kill()


def test_a_sentinel_failover_is_followed_and_waits_for_a_replica(tmp_path: Path) -> None:
    m_port, r_port, s_port = free_port(), free_port(), free_port()
    procs = [_redis(m_port, tmp_path / "m", "--appendonly", "yes")]
    procs.append(_redis(r_port, tmp_path / "r", "--appendonly", "yes", "--replicaof", "127.0.0.1", str(m_port)))
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {s_port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                    f"sentinel monitor svc 127.0.0.1 {m_port} 1\n"
                    "sentinel down-after-milliseconds svc 1000\nsentinel failover-timeout svc 5000\n")
    procs.append(_redis(s_port, tmp_path / "s", sentinel_conf=conf))
    sentinel = redis.Redis(port=s_port, decode_responses=True)

    async def replica_known() -> bool:
        synced = redis.Redis(port=r_port).info("replication").get("master_link_status") == "up"
        return synced and any("s_down" not in r["flags"] and "disconnected" not in r["flags"]
                              for r in sentinel.sentinel_slaves("svc"))

    async def scenario() -> None:
        url = f"redis+sentinel://127.0.0.1:{s_port}/svc"
        store = RedisStore(url, prefix="f:", min_replicas=1, replica_timeout_ms=2000)
        plain = RedisStore(url, prefix="f:")  # Submits not waiting for a replica
        await _until(replica_known, "the sentinel to see the replica")
        for i in range(5):
            await store.add_request(_request(f"r{i}"), "w0")  # returns once the replica has it (WAIT)
        await plain.load_live()  # its pool has connections to the old master
        assert int(sentinel.sentinel_get_master_addr_by_name("svc")[1]) == m_port
        sentinel.sentinel_failover("svc")

        async def moved() -> bool:
            return int(sentinel.sentinel_get_master_addr_by_name("svc")[1]) == r_port

        await _until(moved, "the failover")
        # The store follows the new master within a few seconds, although the old one, still up,
        # stays a master (accepting writes) until the sentinel reconfigures it (~10 s later):
        # writes acknowledged after that are on the new master, none on the demoted one.
        new_master = redis.Redis(port=r_port)
        start, n = time.monotonic(), 0
        while True:
            n += 1
            try:
                await plain.add_request(_request(f"after{n}"), "w0")
                if await asyncio.to_thread(new_master.exists, f"f:req:after{n}"):
                    break
            except Exception:  # noqa: BLE001 - the failover may still be settling
                pass
            assert time.monotonic() - start < 10, "writes did not move to the new master"
            await asyncio.sleep(0.05)
        for i in range(5):
            await plain.add_request(_request(f"later{i}"), "w0")
            assert new_master.exists(f"f:req:later{i}"), "an acknowledged write went to the demoted master"
        assert new_master.role()[0] == b"master"
        assert {f"r{i}" for i in range(5)} <= {m.decode() for m in new_master.zrange("f:live", 0, -1)}, \
            "a Submit confirmed by the replica (WAIT) survives the failover"
        await store.close()
        await plain.close()

        # No replica able to confirm in time: the Submit would fail UNAVAILABLE, saying why.
        lonely = RedisStore(f"redis://127.0.0.1:{free_port_with_redis(tmp_path)}/0", prefix="x:", min_replicas=1,
                            replica_timeout_ms=100)
        with pytest.raises(NotReplicated, match="0 of 1 replica"):
            await lonely.add_request(_request("alone"), "w0")
        # Not accepted, so not left behind: a record in ``live`` would be run by the next scheduler.
        assert await lonely.redis.zscore("x:live", "alone") is None
        assert not await lonely.redis.exists("x:req:alone")
        await lonely.close()

    extra: list[Proc] = []

    def free_port_with_redis(where: Path) -> int:
        port = free_port()
        extra.append(_redis(port, where / "lonely"))
        return port

    try:
        asyncio.run(scenario())
    finally:
        for p in [*procs, *extra]:
            p.kill()


def test_a_malformed_live_record_is_quarantined_not_fatal(tmp_path: Path) -> None:
    port = free_port()
    proc = _redis(port, tmp_path, "--appendonly", "no", "--rename-command", "CONFIG", "")

    async def scenario() -> None:
        store = RedisStore(f"redis://127.0.0.1:{port}/0", prefix="q:")
        report = await durability(store.redis, sentinel=False, min_replicas=0)  # CONFIG disabled: no crash
        # INFO still says the AOF is off; how often it would be fsynced is unknown.
        assert report["appendonly"] == "no" and report["appendfsync"] == "unknown" and "config_get" in report
        assert report["survives_machine_crash"] == "no"
        for rid in ("good1", "no_sampling", "bad_json", "wrong_type", "bad_out", "good2"):
            await store.add_request(_request(rid), "w0")
        r = store.redis
        await r.hdel("q:req:no_sampling", "sampling")
        await r.hset("q:req:bad_json", "slo", "{not json")
        await r.delete("q:req:wrong_type")
        await r.set("q:req:wrong_type", "a string, not a hash")
        await r.hset("q:out:bad_out", "x", "1")  # out: must be a string
        await r.zadd("q:live", {"ghost": 1.0, b"\xff\xfe": 2.0})  # no record; an id that is not UTF-8

        live = await store.load_live()
        assert sorted(x.request.request_id for x in live) == ["good1", "good2"]
        assert sorted(await r.zrange("q:live", 0, -1)) == [b"good1", b"good2"]
        quarantined = set(await r.zrange("q:quarantine", 0, -1))
        assert quarantined == {b"no_sampling", b"bad_json", b"wrong_type", b"bad_out", b"ghost", b"\xff\xfe"}
        assert await r.exists("q:quarantine:req:bad_json", "q:quarantine:out:bad_out") == 2
        assert not await r.exists("q:req:bad_json")
        assert len(await store.load_live()) == 2  # the next start-up is clean
        await store.close()

    try:
        asyncio.run(scenario())
    finally:
        proc.kill()
