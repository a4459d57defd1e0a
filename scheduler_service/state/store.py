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
- ``leader``          the scheduler's lease: ``"{instance}:{fence}"`` with a TTL
- ``fence``           counter: INCR'd by each scheduler that takes the lease (its fencing token)
- ``owner``           hash: request id -> the gateway that submitted or now watches it
                      (``scheduler_service.owners``; written in the background, not fenced)

Block tables are not stored: a restarted scheduler starts a new epoch, every worker drops its
KV cache on seeing it, and every live request is recomputed from its record.

Each iteration's changes go to Redis in one round trip (one Lua script).

**Fencing.** Once a store holds the lease, every durable write it makes (a Submit's record, an
iteration's changes, a cancel's record) is one Lua script that first checks, inside Redis, that
``leader`` still holds this store's value: a scheduler that lost its lease (stalled past it,
partitioned, or Redis reloaded without it) writes nothing, and learns so (``LeaseLost``).
A lease that expired without anyone taking it (``fence`` unchanged since we took it) is taken
back by the same check: no other scheduler has been leader in between.

Finished requests leave ``live`` and keep their record for ``finished_ttl_s`` so that
``GetRequest`` and a late ``WatchMany`` still find them.
"""

from __future__ import annotations

import json
from array import array
from dataclasses import dataclass, field
from typing import Any, Callable

import redis.exceptions as redis_errors

from accelgen.core.request import FinishReason, Request, RequestStatus
from accelgen.core.worker_info import WorkerInfo
from accelgen.wire.sampling import sampling_from_json, sampling_to_json
from accelgen.wire.slo import slo_from_json, slo_to_json
from accelgen.wire.worker_info import worker_info_from_json, worker_info_to_json
from scheduler_service.state import redis_conn
from scheduler_service.state.quarantine import quarantine


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
    # id -> output tokens before this iteration's: appends are checked against it (idempotent
    # retries, lost writes detected). A request without one is appended unchecked.
    offsets: dict[str, int] = field(default_factory=dict)


class LeaseLost(Exception):
    """This scheduler no longer holds the leader lease: another one may be serving. Permanent: a
    retry cannot succeed; the scheduler stops and exits (status 3) to come back as a standby."""


# KEYS[1] = leader, KEYS[2] = fence; ARGV[1] = instance, ARGV[2] = ttl_ms. The fence is INCR'd only
# when the lease is taken, in the same atomic step, and never below Redis's clock in ms: a Redis
# that lost the counter (restarted without persistence, or AOF "everysec" losing its last second)
# still hands out fences above every earlier leader's, which workers have seen. A lease held under
# our own instance id is a previous incarnation of this process slot (kill -9, then restarted by
# its supervisor): taken over at once, with a new fence.
_ACQUIRE = """
local h = redis.call('GET', KEYS[1])
if h and h ~= ARGV[1] and string.sub(h, 1, #ARGV[1] + 1) ~= ARGV[1] .. ':' then return false end
local f = redis.call('INCR', KEYS[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if f < now then
  f = now
  redis.call('SET', KEYS[2], string.format('%d', f))
end
local fence = string.format('%d', f)
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. fence, 'PX', ARGV[2])
return fence
"""

# The lease check every fenced script starts with. KEYS[1] = leader, KEYS[2] = fence; ARGV[1] =
# our lease value ('' = unfenced), ARGV[2] = our fence, ARGV[3] = the lease TTL in ms. A lease
# gone while the counter still says ours (or is gone too: Redis lost its data) was not taken by
# anyone since: it is taken back (and the counter restored).
_HOLDS = """
local function holds()
  if ARGV[1] == '' then return true end
  local h = redis.call('GET', KEYS[1])
  if h == ARGV[1] then return true end
  if h then return false end
  local f = redis.call('GET', KEYS[2])
  if f and f ~= ARGV[2] then return false end
  if not f then redis.call('SET', KEYS[2], ARGV[2]) end
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  return true
end
"""

_RENEW = _HOLDS + """
if not holds() then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"

# KEYS[3..6] = live, req, out, tim; ARGV[4] = request id, ARGV[5] = arrival, ARGV[6..] = hash fields.
# An id may be reused once its request has finished: the old record, its outputs and their expiry
# go, or the new request would start with the old tokens.
_ADD_REQUEST = _HOLDS + """
if not holds() then return 0 end
redis.call('DEL', KEYS[4], KEYS[5], KEYS[6])
redis.call('HSET', KEYS[4], unpack(ARGV, 6))
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[4])
return 1
"""

# A Submit whose record was not confirmed by enough replicas is not accepted: its record goes.
# KEYS[3..6] = live, req, out, tim; ARGV[4] = request id.
_WITHDRAW = _HOLDS + """
if not holds() then return 0 end
redis.call('ZREM', KEYS[3], ARGV[4])
redis.call('DEL', KEYS[4], KEYS[5], KEYS[6])
return 1
"""

# One iteration, one script (a pipeline of hundreds of APPENDs cost more in client-side command
# packing than the Redis work itself). KEYS[3] = live, then the keys of each section in order;
# ARGV[4] = finished TTL, ARGV[5..8] = the sections' sizes (appends, statuses, preemption counts,
# finished requests), then their values. Each append is (tokens, times, expected length of out in
# bytes; -1 = unchecked) so that the script is idempotent: redis-py re-sends a command whose reply
# was lost, and a second APPEND would repeat tokens. Tokens already there are skipped; an output
# shorter than expected (Redis lost acknowledged writes: a failover, AOF everysec on a crashed
# machine) writes nothing and returns the out keys with the gap, for the caller to restore.
_COMMIT = _HOLDS + """
if not holds() then return 0 end
local k, a = 4, 9
local n = tonumber(ARGV[5])
local gaps = {}
for i = 0, n - 1 do
  local off = tonumber(ARGV[a + 3 * i + 2])
  if off >= 0 then
    local cur = redis.call('STRLEN', KEYS[k + 2 * i])
    if cur < off or (cur > off and cur < off + #ARGV[a + 3 * i]) then gaps[#gaps + 1] = KEYS[k + 2 * i] end
  end
end
if #gaps > 0 then return gaps end
for _ = 1, n do
  local off = tonumber(ARGV[a + 2])
  if off < 0 or redis.call('STRLEN', KEYS[k]) == off then
    redis.call('APPEND', KEYS[k], ARGV[a]); redis.call('APPEND', KEYS[k + 1], ARGV[a + 1])
  end
  k = k + 2; a = a + 3
end
for _ = 1, tonumber(ARGV[6]) do
  redis.call('HSET', KEYS[k], 'status', ARGV[a], 'finish_reason', ARGV[a + 1]); k = k + 1; a = a + 2
end
for _ = 1, tonumber(ARGV[7]) do redis.call('HSET', KEYS[k], 'preemptions', ARGV[a]); k = k + 1; a = a + 1 end
for _ = 1, tonumber(ARGV[8]) do
  redis.call('ZREM', KEYS[3], ARGV[a]); a = a + 1
  for _ = 1, 3 do redis.call('EXPIRE', KEYS[k], ARGV[4]); k = k + 1 end
end
return 1
"""

# KEYS[3..4] = out, tim; ARGV[4..5] = their whole contents: a request's output as delivered.
_RESTORE_OUTPUT = _HOLDS + """
if not holds() then return 0 end
redis.call('SET', KEYS[3], ARGV[4]); redis.call('SET', KEYS[4], ARGV[5])
return 1
"""


class OutputGap(Exception):
    """Redis holds fewer output tokens for these requests than were committed and delivered (it
    lost acknowledged writes). Nothing of the iteration was written; restore their outputs
    (``restore_output``) and write it again."""

    def __init__(self, request_ids: list[str]) -> None:
        super().__init__(f"Redis lost committed output tokens of {len(request_ids)} request(s): "
                         + ", ".join(request_ids[:5]))
        self.request_ids = request_ids


class RedisStore:
    def __init__(self, url: str, prefix: str = "accelgen:", finished_ttl_s: int = 3600,
                 max_connections: int = 64, retry_s: float = redis_conn.DEFAULT_RETRY_S, min_replicas: int = 0,
                 replica_timeout_ms: int = 1000) -> None:
        # redis://, rediss://, unix:// or redis+sentinel://; a blocking pool, and every command
        # retried on a fresh connection (to the current master) for up to retry_s: see redis_conn.
        self.redis = redis_conn.connect(url, max_connections=max_connections, retry_s=retry_s)
        self.sentinel = url.startswith(redis_conn.SENTINEL_SCHEME + "://")
        self.min_replicas = min_replicas  # replicas that must confirm every durable write (WAIT)
        self.replica_timeout_ms = replica_timeout_ms
        self.p = prefix
        self.finished_ttl_s = finished_ttl_s
        self._acquire = self.redis.register_script(_ACQUIRE)
        self._renew = self.redis.register_script(_RENEW)
        self._release = self.redis.register_script(_RELEASE)
        self._add = self.redis.register_script(_ADD_REQUEST)
        self._commit = self.redis.register_script(_COMMIT)
        self._restore = self.redis.register_script(_RESTORE_OUTPUT)
        self._withdraw = self.redis.register_script(_WITHDRAW)
        # The lease this store holds ("{instance}:{fence}"; '' = none: writes are not fenced).
        self.lease_value = ""
        self.fence = 0  # sent with every plan: workers refuse plans from a deposed scheduler
        self.lease_ttl_ms = 0
        # Called (once per detection, before LeaseLost is raised) by whichever write notices the
        # loss, so the committer, a Submit and the lease monitor all trigger the same stop.
        self.on_lease_lost: Callable[[str], None] | None = None

    async def close(self) -> None:
        await self.redis.aclose()

    async def _write(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Run a fenced write script. With ``min_replicas`` > 0, a WAIT follows it in the same round
        trip, on the same connection (so it counts exactly this write): the caller hears of the
        write only once that many replicas have it (up to ``replica_timeout_ms``), else
        ``redis_conn.NotReplicated`` (transient: every write is idempotent, so it is retried)."""
        if self.min_replicas <= 0:
            return await script(keys=keys, args=args)
        async with self.redis.pipeline(transaction=False) as pipe:
            await script(keys=keys, args=args, client=pipe)
            pipe.execute_command("WAIT", self.min_replicas, self.replica_timeout_ms)
            result, acked = await pipe.execute()
        if result and int(acked) < self.min_replicas:  # (a fenced-off write wrote nothing: no wait)
            raise redis_conn.NotReplicated(int(acked), self.min_replicas, self.replica_timeout_ms)
        return result

    # -- leader lease ------------------------------------------------------------------------
    def _lease_keys(self) -> list[str]:
        return [self.p + "leader", self.p + "fence"]

    def _lease_args(self) -> list[str | int]:
        return [self.lease_value, str(self.fence), self.lease_ttl_ms]

    async def acquire_lease(self, instance: str, ttl_ms: int) -> int | None:
        """Take the lease if nobody holds it: returns its fence (a new one, greater than every
        earlier leader's), or None. One atomic script: no two schedulers get the same fence."""
        fence = await self._acquire(keys=self._lease_keys(), args=[instance, ttl_ms])
        if fence is None:
            return None
        self.fence, self.lease_ttl_ms = int(fence), ttl_ms
        self.lease_value = f"{instance}:{self.fence}"
        return self.fence

    async def renew_lease(self, ttl_ms: int) -> bool:
        """Extend our lease (compare-and-pexpire, atomic). False: another scheduler holds it, or
        it expired and was taken since (the fence moved on) — this scheduler is deposed."""
        if not self.lease_value:
            return False
        self.lease_ttl_ms = ttl_ms
        return bool(await self._renew(keys=self._lease_keys(), args=self._lease_args()))

    async def release_lease(self) -> None:
        """Give the lease up (compare-and-delete): a standby takes it at its next poll."""
        if self.lease_value:
            await self._release(keys=[self.p + "leader"], args=[self.lease_value])

    def _lost(self, what: str) -> LeaseLost:
        message = (f"this scheduler lost the leader lease ({self.lease_value}) and may no longer write "
                   f"({what} refused); another scheduler is the leader: retry there")
        if self.on_lease_lost is not None:
            self.on_lease_lost(message)
        return LeaseLost(message)

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
        p = self.p
        keys = [*self._lease_keys(), p + "live", p + f"req:{rid}", p + f"out:{rid}", p + f"tim:{rid}"]
        args = [*self._lease_args(), rid, repr(request.arrival_s)]
        for name, value in fields.items():
            args += (name, value)
        try:
            written = await self._write(self._add, keys, args)  # one round trip, fenced (see _ADD_REQUEST)
        except redis_conn.NotReplicated:
            # The client is told UNAVAILABLE (not accepted): a record left in ``live`` would be run
            # by the next scheduler to recover it. Best effort: if this fails too, it is recovered.
            try:
                await self._withdraw(keys=keys[:6], args=[*self._lease_args(), rid])
            except Exception:  # noqa: BLE001 - Redis failing over; the caller's error stands
                pass
            raise
        if not written:
            raise self._lost(f"the record of request {rid!r}")

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
        """Every live request. One that cannot be read (a missing field, bad JSON, a wrong-typed
        key, no record) is quarantined and logged: it must not crash-loop start-up."""
        records = []
        for member in await self.redis.zrange(self.p + "live", 0, -1):
            try:
                rec = await self.load_request(member.decode())
            except UnicodeDecodeError:
                await quarantine(self.redis, self.p, member, "request id is not UTF-8")
                continue
            except BadRecord as exc:
                await quarantine(self.redis, self.p, member, str(exc))
                continue
            except redis_errors.ResponseError as exc:  # WRONGTYPE and the like; transient ones propagate
                if redis_conn.is_transient(exc):
                    raise
                await quarantine(self.redis, self.p, member, f"unreadable: {exc}")
                continue
            if rec is None:
                await quarantine(self.redis, self.p, member, "no record (at most status fields written after it was lost)")
                continue
            records.append(rec)
        return records

    async def commit_iteration(self, ch: IterationChanges) -> None:
        """Every change of one iteration in one round trip: one Lua script, atomic, fenced (it
        checks the lease first and writes nothing if this scheduler lost it: ``LeaseLost``), and
        idempotent (tokens already there are not appended again; ``OutputGap`` if fewer are)."""
        p = self.p
        keys: list[str] = [*self._lease_keys(), p + "live"]
        appends: list[Any] = []
        for rid, (tokens, times) in ch.tokens.items():
            keys += (p + f"out:{rid}", p + f"tim:{rid}")
            offset = ch.offsets.get(rid)
            appends += (pack_u32(tokens), array("d", times).tobytes(), -1 if offset is None else 4 * offset)
        statuses: list[str] = []
        for rid, (status, reason) in ch.status.items():
            keys.append(p + f"req:{rid}")
            statuses += (status_text(status), reason)
        keys += [p + f"req:{rid}" for rid in ch.preemptions]
        for rid in ch.finished:
            keys += (p + f"req:{rid}", p + f"out:{rid}", p + f"tim:{rid}")
        args: list[Any] = [*self._lease_args(), self.finished_ttl_s, len(ch.tokens), len(ch.status),
                           len(ch.preemptions), len(ch.finished), *appends, *statuses,
                           *(str(n) for n in ch.preemptions.values()), *ch.finished]
        result = await self._write(self._commit, keys, args)
        if isinstance(result, list):
            prefix = len(p + "out:")
            raise OutputGap([key.decode()[prefix:] if isinstance(key, bytes) else key[prefix:] for key in result])
        if not result:
            raise self._lost(f"the commit of worker {ch.worker_id}'s iteration")

    async def restore_output(self, request_id: str, tokens: list[int], times: list[float]) -> None:
        """Set a request's stored output to ``tokens`` (and their emission times): what its clients
        were delivered, after Redis lost some of it. Fenced like every durable write."""
        p = self.p
        keys = [*self._lease_keys(), p + f"out:{request_id}", p + f"tim:{request_id}"]
        args = [*self._lease_args(), pack_u32(tokens), array("d", times).tobytes()]
        if not await self._write(self._restore, keys, args):
            raise self._lost(f"restoring the output of request {request_id!r}")

    # -- owners --------------------------------------------------------------------------------
    async def load_owners(self) -> dict[str, str]:
        """Request id -> owning gateway, as last written."""
        raw = await self.redis.hgetall(self.p + "owner")
        return {rid.decode(): owner.decode() for rid, owner in raw.items()}

    async def write_owners(self, owners: dict[str, str], forget: set[str]) -> None:
        """Record ``owners`` (request id -> gateway) and drop the ids in ``forget``, one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            if owners:
                pipe.hset(self.p + "owner", mapping=owners)
            if forget:
                pipe.hdel(self.p + "owner", *forget)
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


class BadRecord(ValueError):
    """A stored request that cannot be decoded (``load_live`` quarantines it)."""


def _decode(rid: str, h: dict[bytes, bytes], out: bytes | None, tim: bytes | None) -> StoredRequest:
    try:
        return _decode_fields(rid, h, out, tim)
    except Exception as exc:  # noqa: BLE001 - whatever is wrong with the bytes, say which and what
        raise BadRecord(f"request {rid!r}: malformed record: {type(exc).__name__}: {exc}") from exc


def _decode_fields(rid: str, h: dict[bytes, bytes], out: bytes | None, tim: bytes | None) -> StoredRequest:
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
