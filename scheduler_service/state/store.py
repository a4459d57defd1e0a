"""Redis: the source of truth for everything that must survive a scheduler crash.

Layout (every key under a configurable prefix, default ``accelgen:``):

- ``req:{id}``        hash: prompt (uint32 array), sampling / slo (JSON), app_class, arrival,
                      eos, status, finish_reason, preemptions, worker
- ``out:{id}``        string: output token ids, appended 4 bytes a token (APPEND is O(1))
- ``tim:{id}``        string: emission times, appended 8 bytes a token
- ``live``            sorted set: unfinished request ids by arrival — the durable queue
- ``workers``         hash: worker id -> JSON: its address and its ``WorkerInfo`` fields
                      (``accelgen.wire.worker_info``)
- ``alive:{worker}``  string with a TTL, refreshed by heartbeats
- ``leader``          the scheduler's lease (SET NX PX)

Block tables are not stored: a restarted scheduler starts a new epoch, every worker drops its
KV cache on seeing it, and every live request is recomputed from its record.

Each iteration's changes go to Redis in one pipelined MULTI/EXEC round trip.
Finished requests leave ``live`` and keep their record for ``finished_ttl_s`` so that
``GetRequest`` and a late ``WatchMany`` still find them.
"""

from __future__ import annotations

import json
from array import array
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from accelgen.core.request import FinishReason, Request, RequestStatus
from accelgen.core.worker_info import WorkerInfo
from accelgen.wire.sampling import sampling_from_json, sampling_to_json
from accelgen.wire.slo import slo_from_json, slo_to_json
from accelgen.wire.worker_info import worker_info_from_json, worker_info_to_json


def pack_u32(values: list[int]) -> bytes:
    return array("I", values).tobytes()


def unpack_u32(data: bytes | None) -> list[int]:
    out = array("I")
    if data:
        out.frombytes(data)
    return out.tolist()


def unpack_f64(data: bytes | None) -> list[float]:
    out = array("d")
    if data:
        out.frombytes(data)
    return out.tolist()


@dataclass
class StoredRequest:
    """A request as persisted, plus what it has produced so far."""

    request: Request
    emitted_at: list[float]
    worker_id: str = ""


@dataclass
class IterationChanges:
    """Everything one iteration changed, written in one round trip."""

    worker_id: str  # whose lane wrote it (for the logs)
    tokens: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    status: dict[str, tuple[RequestStatus, str]] = field(default_factory=dict)  # id -> (status, finish_reason)
    preemptions: dict[str, int] = field(default_factory=dict)
    finished: list[str] = field(default_factory=list)


# Appends every (key, bytes) pair in one command: a pipeline of hundreds of APPENDs costs more
# in client-side command packing than the Redis work itself.
_APPEND_ALL = "for i = 1, #KEYS do redis.call('APPEND', KEYS[i], ARGV[i]) end return #KEYS"


class RedisStore:
    def __init__(self, url: str, prefix: str = "accelgen:", finished_ttl_s: int = 3600,
                 max_connections: int = 64) -> None:
        # A blocking pool: a burst of Submits beyond max_connections waits for a connection
        # (up to 5 s) instead of failing with "Too many connections", redis-py's default pool.
        # After a Redis restart every pooled connection is dead; a command on one would fail
        # UNAVAILABLE although Redis is back. A connection idle for a second is pinged before use
        # (and reconnected), and a connection error is retried on a fresh connection.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=5.0, socket_timeout=5.0, socket_connect_timeout=5.0,
            health_check_interval=1.0, retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
            retry_on_error=[redis_errors.ConnectionError, redis_errors.TimeoutError])
        self.redis = aioredis.Redis.from_pool(pool)  # owns the pool: aclose() disconnects it
        self.p = prefix
        self.finished_ttl_s = finished_ttl_s
        self._append_all = self.redis.register_script(_APPEND_ALL)

    async def close(self) -> None:
        await self.redis.aclose()

    # -- leader lease ------------------------------------------------------------------------
    async def acquire_lease(self, instance: str, ttl_ms: int) -> bool:
        key = self.p + "leader"
        if await self.redis.set(key, instance, nx=True, px=ttl_ms):
            return True
        holder = await self.redis.get(key)
        if holder == instance.encode():
            await self.redis.pexpire(key, ttl_ms)
            return True
        return False

    async def release_lease(self, instance: str) -> None:
        key = self.p + "leader"
        if await self.redis.get(key) == instance.encode():
            await self.redis.delete(key)

    # -- requests ------------------------------------------------------------------------------
    async def add_request(self, request: Request, worker_id: str) -> None:
        rid = request.request_id
        fields: dict[str, Any] = {
            "prompt": pack_u32(request.prompt_token_ids),
            "sampling": sampling_to_json(request.sampling),
            "slo": slo_to_json(request.slo),
            "app_class": request.app_class,
            "arrival": repr(request.arrival_s),
            "eos": "" if request.eos_token_id is None else str(request.eos_token_id),
            "status": status_text(request.status),
            "finish_reason": "",
            "preemptions": "0",
            "worker": worker_id,
        }
        async with self.redis.pipeline(transaction=True) as pipe:
            # An id may be reused once its request has finished: the old record, its outputs and
            # their expiry go, or the new request would start with the old tokens.
            pipe.delete(self.p + f"req:{rid}", self.p + f"out:{rid}", self.p + f"tim:{rid}")
            pipe.hset(self.p + f"req:{rid}", mapping=fields)
            pipe.zadd(self.p + "live", {rid: request.arrival_s})
            await pipe.execute()

    async def load_request(self, request_id: str) -> StoredRequest | None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.p + f"req:{request_id}")
            pipe.get(self.p + f"out:{request_id}")
            pipe.get(self.p + f"tim:{request_id}")
            h, out, tim = await pipe.execute()
        if b"prompt" not in h:
            # Nothing, or only fields an iteration commit or a cancel wrote after Redis lost the
            # record (restarted without persistence): not a request we can describe.
            return None
        return _decode(request_id, h, out, tim)

    async def load_live(self) -> list[StoredRequest]:
        ids = [i.decode() for i in await self.redis.zrange(self.p + "live", 0, -1)]
        records = []
        for rid in ids:
            rec = await self.load_request(rid)
            if rec is not None:
                records.append(rec)
        return records

    async def commit_iteration(self, ch: IterationChanges) -> None:
        """One MULTI/EXEC round trip with every change of one iteration."""
        p = self.p
        async with self.redis.pipeline(transaction=True) as pipe:
            if ch.tokens:
                keys: list[str] = []
                args: list[bytes] = []
                for rid, (tokens, times) in ch.tokens.items():
                    keys += (p + f"out:{rid}", p + f"tim:{rid}")
                    args += (pack_u32(tokens), array("d", times).tobytes())
                await self._append_all(keys=keys, args=args, client=pipe)
            for rid, (status, reason) in ch.status.items():
                pipe.hset(p + f"req:{rid}", mapping={"status": status_text(status), "finish_reason": reason})
            for rid, n in ch.preemptions.items():
                pipe.hset(p + f"req:{rid}", "preemptions", str(n))
            for rid in ch.finished:
                pipe.zrem(p + "live", rid)
                for key in (f"req:{rid}", f"out:{rid}", f"tim:{rid}"):
                    pipe.expire(p + key, self.finished_ttl_s)
            await pipe.execute()

    # -- workers -------------------------------------------------------------------------------
    async def register_worker(self, worker_id: str, address: str, info: WorkerInfo, ttl_s: float) -> None:
        entry = json.dumps({"address": address, **json.loads(worker_info_to_json(info))})
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.p + "workers", worker_id, entry)
            pipe.set(self.p + f"alive:{worker_id}", "1", px=int(ttl_s * 1000))
            await pipe.execute()

    async def heartbeat(self, worker_id: str, ttl_s: float) -> None:
        await self.redis.set(self.p + f"alive:{worker_id}", "1", px=int(ttl_s * 1000))

    async def remove_worker(self, worker_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(self.p + "workers", worker_id)
            pipe.delete(self.p + f"alive:{worker_id}")
            await pipe.execute()

    async def live_workers(self) -> dict[str, tuple[str, WorkerInfo]]:
        """Worker id -> (address, WorkerInfo) of every registered worker still heart-beating."""
        raw = await self.redis.hgetall(self.p + "workers")
        out = {}
        for wid_b, entry in raw.items():
            wid = wid_b.decode()
            if await self.redis.exists(self.p + f"alive:{wid}"):
                out[wid] = (json.loads(entry)["address"], worker_info_from_json(entry))
        return out


def status_text(status: RequestStatus) -> str:
    """How a status is stored: its name in lower case ("running", "cancelled", ...)."""
    return status.name.lower()


def status_from_text(text: str) -> RequestStatus:
    return RequestStatus[text.upper()]


def _decode(rid: str, h: dict[bytes, bytes], out: bytes | None, tim: bytes | None) -> StoredRequest:
    g = {k.decode(): v for k, v in h.items()}
    eos = g.get("eos", b"").decode()
    request = Request(
        request_id=rid,
        prompt_token_ids=unpack_u32(g["prompt"]),
        sampling=sampling_from_json(g["sampling"]),
        slo=slo_from_json(g["slo"]),
        app_class=g["app_class"].decode(),
        arrival_s=float(g["arrival"]),
        eos_token_id=int(eos) if eos else None,
    )
    request.output_token_ids = unpack_u32(out)
    request.status = status_from_text(g["status"].decode())
    reason = g.get("finish_reason", b"").decode()
    request.num_preemptions = int(g.get("preemptions", b"0"))
    times = unpack_f64(tim)
    if times:
        request.first_token_s, request.last_token_s = times[0], times[-1]
    if reason:
        request.finish_reason = FinishReason(reason)
    return StoredRequest(request=request, emitted_at=times, worker_id=g.get("worker", b"").decode())
