"""Redis: the source of truth for everything that must survive a scheduler crash.

Layout (every key under a configurable prefix, default ``accelgen:``):

- ``req:{id}``        hash: prompt (uint32 array), sampling / slo (JSON), app_class, arrival,
                      eos, status, finish_reason, preemptions, worker, tenant, label (the last two
                      absent from records written before them: read as ""), stop (JSON list of
                      the client's stop strings) and include_stop ("1"/""), absent from older
                      records and read as none
- ``out:{id}``        string: output token ids, appended 4 bytes a token (APPEND is O(1))
- ``tim:{id}``        string: emission times, appended 8 bytes a token
- ``lp:{id}``         string: the output tokens' logprobs, one self-delimiting record a token
                      appended with it (``accelgen.wire.logprobs.pack_logprobs``); only for a
                      request that asked (``SamplingParams.logprobs``): others have no such key
- ``live``            sorted set: unfinished request ids by arrival — the durable queue
- ``workers``         hash: worker id -> JSON: its address, its ``WorkerInfo`` fields
                      (``accelgen.wire.worker_info``) and "identity", the fingerprint of the
                      certificate the id is bound to (``scheduler_service.worker_identity``;
                      absent from records written before it, or "": unbound)
- ``alive:{worker}``  string with a TTL, refreshed by heartbeats
- ``draining``        hash: worker id -> the wall-clock end of its drain's grace period
                      (``scheduler_service.workers``: it is routed no new request)
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
``GetRequest`` and a late ``WatchMany`` still find them; meanwhile their id is taken
(``RequestIdTaken``). The Lua scripts are in ``scripts``.
"""

from __future__ import annotations

import json
from array import array
from dataclasses import dataclass, field
from typing import Any, Callable

import redis.exceptions as redis_errors

from accelgen.core.logprobs import TokenLogprob
from accelgen.core.request import FinishReason, Request, RequestStatus
from accelgen.core.worker_info import WorkerInfo
from accelgen.wire.logprobs import pack_logprobs, unpack_logprobs
from accelgen.wire.sampling import sampling_from_json, sampling_to_json
from accelgen.wire.slo import slo_from_json, slo_to_json
from accelgen.wire.worker_info import worker_info_from_json, worker_info_to_json
from scheduler_service.state import redis_conn, scripts
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
    # Who the request belongs to and the client's own name for it: service metadata, not the
    # core's (the scheduler never schedules by them); the gateway checks the tenant.
    tenant: str = ""
    label: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output token; empty: not asked
    # The client's stop strings (the gateway applies them; an Attach re-applies them from here).
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False


@dataclass(frozen=True)
class StoredWorker:
    """A registered worker as persisted: where it listens, what it is, whose certificate holds it."""

    address: str
    info: WorkerInfo
    identity: str = ""  # "": bound to no certificate
    draining_until: float = 0.0  # draining (DrainWorker) until this wall-clock time; 0: not draining


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
    applied_at: float = 0.0  # when the lane applied the iteration (Unix time; 0: not an iteration)
    # id -> the logprobs of its ``tokens``, one each, for the requests that asked for them: stored
    # with the tokens (appended only when they are), delivered with them.
    logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)
    # id -> (output tokens kept, bytes of their logprob records): the stored output is cut to them
    # (a request a gateway finished for a stop string: ``truncation``).
    truncate: dict[str, tuple[int, int]] = field(default_factory=dict)


def truncation(keep: int, logprobs: list[TokenLogprob]) -> tuple[int, int]:
    """``IterationChanges.truncate``'s value keeping ``keep`` tokens, ``logprobs`` being those
    delivered (empty: none asked): the byte length of a request's lp records is not fixed."""
    return keep, len(pack_logprobs(logprobs[:keep])) if logprobs else 0


class LeaseLost(Exception):
    """This scheduler no longer holds the leader lease: another one may be serving. Permanent: a
    retry cannot succeed; the scheduler stops and exits (status 3) to come back as a standby."""


class RequestIdTaken(Exception):
    """Another request's record (live, or finished and still kept) holds this id."""


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
        self._acquire = self.redis.register_script(scripts.ACQUIRE)
        self._renew = self.redis.register_script(scripts.RENEW)
        self._release = self.redis.register_script(scripts.RELEASE)
        self._add = self.redis.register_script(scripts.ADD_REQUEST)
        self._commit = self.redis.register_script(scripts.COMMIT)
        self._restore = self.redis.register_script(scripts.RESTORE_OUTPUT)
        self._withdraw = self.redis.register_script(scripts.WITHDRAW)
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
        if result and result != scripts.ID_TAKEN and int(acked) < self.min_replicas:  # (wrote nothing: no wait)
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
    async def add_request(self, request: Request, worker_id: str, tenant: str = "", label: str = "",
                          stop: tuple[str, ...] = (), include_stop: bool = False) -> None:
        """The durable accept: fenced, idempotent for its own retry, ``RequestIdTaken`` if the id
        has a record (``scripts.ADD_REQUEST``)."""
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
            "tenant": tenant,
            "label": label,
            "stop": json.dumps(list(stop)),
            "include_stop": "1" if include_stop else "",
        }
        p = self.p
        keys = [*self._lease_keys(), p + "live", *(p + f"{kind}:{rid}" for kind in ("req", "out", "tim", "lp"))]
        args = [*self._lease_args(), rid, repr(request.arrival_s)]
        for name, value in fields.items():
            args += (name, value)
        try:
            written = await self._write(self._add, keys, args)  # one round trip, fenced
        except redis_conn.NotReplicated:
            # The client is told UNAVAILABLE (not accepted): a record left in ``live`` would be run
            # by the next scheduler to recover it. Best effort: if this fails too, it is recovered.
            try:
                await self._withdraw(keys=keys, args=[*self._lease_args(), rid])
            except Exception:  # noqa: BLE001 - Redis failing over; the caller's error stands
                pass
            raise
        if written == scripts.ID_TAKEN:
            raise RequestIdTaken(f"request_id {rid!r} is already in use (by a request running or finished "
                                 f"less than finished_ttl_s = {self.finished_ttl_s} s ago)")
        if not written:
            raise self._lost(f"the record of request {rid!r}")

    async def load_request(self, request_id: str) -> StoredRequest | None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.p + f"req:{request_id}")
            pipe.get(self.p + f"out:{request_id}")
            pipe.get(self.p + f"tim:{request_id}")
            pipe.get(self.p + f"lp:{request_id}")
            h, out, tim, lp = await pipe.execute()
        if b"prompt" not in h:
            # Nothing, or only fields an iteration commit or a cancel wrote after Redis lost the
            # record (restarted without persistence): not a request we can describe.
            return None
        return _decode(request_id, h, out, tim, lp)

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
        order = {rid: i for i, rid in enumerate(ch.tokens, start=1)}
        lp_appends: list[Any] = []  # (the append's number, records, expected length of lp in bytes)
        for rid, lps in ch.logprobs.items():
            if rid in order and lps:
                keys.append(p + f"lp:{rid}")
                records = pack_logprobs(lps)
                lp_appends += (order[rid], records, _lp_offset(ch.offsets.get(rid), records, len(lps)))
        cuts: list[int] = []
        for rid, (kept, lp_bytes) in ch.truncate.items():
            keys += (p + f"out:{rid}", p + f"tim:{rid}", p + f"lp:{rid}")
            cuts += (kept, lp_bytes)
        statuses: list[str] = []
        for rid, (status, reason) in ch.status.items():
            keys.append(p + f"req:{rid}")
            statuses += (status_text(status), reason)
        keys += [p + f"req:{rid}" for rid in ch.preemptions]
        for rid in ch.finished:
            keys += (p + f"req:{rid}", p + f"out:{rid}", p + f"tim:{rid}", p + f"lp:{rid}")
        args: list[Any] = [*self._lease_args(), self.finished_ttl_s, len(ch.tokens), len(ch.status),
                           len(ch.preemptions), len(ch.finished), len(lp_appends) // 3, len(ch.truncate),
                           *appends, *lp_appends, *cuts, *statuses, *(str(n) for n in ch.preemptions.values()), *ch.finished]
        result = await self._write(self._commit, keys, args)
        if isinstance(result, list):
            prefix = len(p + "out:")
            raise OutputGap([key.decode()[prefix:] if isinstance(key, bytes) else key[prefix:] for key in result])
        if not result:
            raise self._lost(f"the commit of worker {ch.worker_id}'s iteration")

    async def restore_output(self, request_id: str, tokens: list[int], times: list[float],
                             logprobs: list[TokenLogprob] | tuple[()] = ()) -> None:
        """Set a request's stored output to ``tokens`` (and their emission times and logprobs):
        what its clients were delivered, after Redis lost some of it. Fenced like every durable write."""
        p = self.p
        keys = [*self._lease_keys(), p + f"out:{request_id}", p + f"tim:{request_id}", p + f"lp:{request_id}"]
        args = [*self._lease_args(), pack_u32(tokens), array("d", times).tobytes(), pack_logprobs(logprobs)]
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
    async def register_worker(self, worker_id: str, address: str, info: WorkerInfo, ttl_s: float,
                              identity: str = "", draining_until: float = 0.0) -> None:
        entry = json.dumps({"address": address, "identity": identity, **json.loads(worker_info_to_json(info))})
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.p + "workers", worker_id, entry)
            pipe.set(self.p + f"alive:{worker_id}", "1", px=int(ttl_s * 1000))
            if draining_until:
                pipe.hset(self.p + "draining", worker_id, repr(draining_until))
            else:
                pipe.hdel(self.p + "draining", worker_id)
            await pipe.execute()

    async def set_draining(self, worker_id: str, until: float) -> None:
        """Mark a registered worker draining until ``until`` (wall clock), for a scheduler that takes over."""
        await self.redis.hset(self.p + "draining", worker_id, repr(until))

    async def heartbeat(self, worker_id: str, ttl_s: float) -> None:
        await self.redis.set(self.p + f"alive:{worker_id}", "1", px=int(ttl_s * 1000))

    async def remove_worker(self, worker_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(self.p + "workers", worker_id)
            pipe.hdel(self.p + "draining", worker_id)
            pipe.delete(self.p + f"alive:{worker_id}")
            await pipe.execute()

    async def live_worker_records(self) -> dict[str, StoredWorker]:
        """Every registered worker still heart-beating, by id."""
        raw = await self.redis.hgetall(self.p + "workers")
        draining = await self.redis.hgetall(self.p + "draining")
        out = {}
        for wid_b, entry in raw.items():
            wid = wid_b.decode()
            if await self.redis.exists(self.p + f"alive:{wid}"):
                data = json.loads(entry)
                out[wid] = StoredWorker(data["address"], worker_info_from_json(entry), str(data.get("identity") or ""),
                                        float(draining.get(wid_b) or 0.0))
        return out

    async def live_workers(self) -> dict[str, tuple[str, WorkerInfo]]:
        """Worker id -> (address, WorkerInfo): ``live_worker_records`` without the identities."""
        return {wid: (w.address, w.info) for wid, w in (await self.live_worker_records()).items()}


def _lp_offset(token_offset: int | None, records: bytes, num_tokens: int) -> int:
    """Where a request's logprob records start in ``lp``, in bytes: every record of a request is
    the same size (the sampled token plus its k top tokens), so the offset of its tokens times that
    size; -1 (append exactly when the tokens are appended) when unknown or the sizes differ."""
    if token_offset is None or len(records) % num_tokens:
        return -1
    return token_offset * (len(records) // num_tokens)


def status_text(status: RequestStatus) -> str:
    """How a status is stored: its name in lower case ("running", "cancelled", ...)."""
    return status.name.lower()


def status_from_text(text: str) -> RequestStatus:
    return RequestStatus[text.upper()]


class BadRecord(ValueError):
    """A stored request that cannot be decoded (``load_live`` quarantines it)."""


def _decode(rid: str, h: dict[bytes, bytes], out: bytes | None, tim: bytes | None,
            lp: bytes | None = None) -> StoredRequest:
    try:
        return _decode_fields(rid, h, out, tim, lp)
    except Exception as exc:  # noqa: BLE001 - whatever is wrong with the bytes, say which and what
        raise BadRecord(f"request {rid!r}: malformed record: {type(exc).__name__}: {exc}") from exc


def _decode_fields(rid: str, h: dict[bytes, bytes], out: bytes | None, tim: bytes | None,
                   lp: bytes | None) -> StoredRequest:
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
    return StoredRequest(request=request, emitted_at=times, worker_id=g.get("worker", b"").decode(),
                         tenant=g.get("tenant", b"").decode(), label=g.get("label", b"").decode(),
                         logprobs=unpack_logprobs(lp), stop=tuple(json.loads(g.get("stop", b"[]") or b"[]")),
                         include_stop_str_in_output=bool(g.get("include_stop", b"")))
