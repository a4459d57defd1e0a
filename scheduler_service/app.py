"""The scheduler service's state machine around the pure core: routing, workers, recovery, delivery.

- **Routing.** Each worker has a lane (its own core and KV accounting); a new request goes to
  the lane with the least work left.
- **Workers.** Registered workers are kept in Redis with a heartbeat TTL. A worker that stops
  heart-beating, fails an iteration or deregisters is dropped: its unfinished requests are
  adopted by the other lanes and recomputed (their outputs so far are kept).
- **Recovery.** A (re)started scheduler takes the leader lease, starts a new *epoch* (workers
  drop their caches when they see it), and adopts every live request from Redis: nothing
  accepted is lost, and since every block table starts empty, no KV block is leaked. Each lane
  has an epoch of its own (the scheduler's plus a generation), so a worker given a fresh lane
  drops what an older lane left there, and a worker re-registering after a blip keeps its lane.
- **Delivery.** Tokens are published to watchers only after the iteration's Redis write.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

import structlog

from accelgen.v1 import scheduler_pb2
from scheduler_service import convert
from accelgen.wire.slo import slo_to_proto
from scheduler_service.config import SchedulerConfig
from accelgen.core.profile import DeviceProfile
from accelgen.core.admission import AdmissionRefused
from scheduler_service.errors import ServiceError
from accelgen.core.request import Request
from scheduler_service.lane import WorkerLane
from accelgen.profiles import load_profile
from scheduler_service.state.store import IterationChanges, RedisStore, StoredRequest
from scheduler_service.watch import WatchSession

log = structlog.get_logger("scheduler")


# A registration with the same values is the same worker (a restarted worker process with the
# same id is caught by its first plan: it knows none of the lane's requests, the iteration fails
# INVALID_ARGUMENT, the lane is dropped and the worker re-registers into a fresh one).
_SAME_WORKER_KEYS = ("address", "model", "executor", "block_size", "num_blocks", "max_model_len", "vocab_size",
                     "max_num_seqs", "max_num_batched_tokens", "profile_json")


@dataclass
class RequestChannel:
    """What watchers of one request see: its tokens so far and whether it is done."""

    request_id: str
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    finished: bool = False
    finish_reason: str = ""
    event: asyncio.Event = field(default_factory=asyncio.Event)
    watchers: set[WatchSession] = field(default_factory=set)  # WatchMany streams watching it

    def notify(self) -> None:
        self.event.set()
        self.event = asyncio.Event()
        for session in self.watchers:
            session.mark(self.request_id)


class SchedulerApp:
    def __init__(self, config: SchedulerConfig, store: RedisStore) -> None:
        self.config = config
        self.store = store
        self.catalog = config.catalog()
        self.profile = load_profile(config.profile)
        self.epoch = uuid.uuid4().hex[:12]
        self._lane_generation = 0  # lane epochs are f"{epoch}.{generation}"
        self.lanes: dict[str, WorkerLane] = {}
        self.owner: dict[str, str] = {}  # request id -> worker id
        self.channels: dict[str, RequestChannel] = {}
        self.orphans: list[Request] = []  # unfinished requests with no live worker to run them
        self._accepting: dict[str, asyncio.Task] = {}  # request id -> its Submit's write to Redis
        self._background: set[asyncio.Task] = set()  # fire-and-forget work, kept referenced
        self._dropping: dict[str, WorkerLane] = {}  # lanes being stopped, until their requests move on
        self._cancel_after_accept: set[str] = set()  # cancelled while their Submit was being written
        self._monitor: asyncio.Task | None = None
        self._stopping = False

    # -- life cycle ---------------------------------------------------------------------------
    async def start(self, lease_wait_s: float = 60.0) -> None:
        deadline = time.monotonic() + lease_wait_s
        ttl_ms = int(self.config.lease_ttl_s * 1000)
        while not await self.store.acquire_lease(self.config.instance_id, ttl_ms):
            if time.monotonic() > deadline:
                raise RuntimeError("another scheduler holds the leader lease")
            await asyncio.sleep(min(0.5, self.config.lease_ttl_s / 4))
        await self.store.clear_block_tables()
        for wid, desc in (await self.store.live_workers()).items():
            self._add_lane(wid, desc)
        recovered = await self.store.load_live()
        for rec in recovered:
            self._adopt(rec)
        log.info("scheduler_started", epoch=self.epoch, workers=len(self.lanes), recovered=len(recovered))
        self._monitor = asyncio.create_task(self._monitor_loop(), name="monitor")

    async def stop(self) -> None:
        self._stopping = True
        if self._monitor is not None:
            self._monitor.cancel()
        for lane in list(self.lanes.values()):
            await lane.stop(commit_timeout_s=5.0)
        await self.store.release_lease(self.config.instance_id)

    async def _monitor_loop(self) -> None:
        ttl_ms = int(self.config.lease_ttl_s * 1000)
        while not self._stopping:
            await asyncio.sleep(min(self.config.heartbeat_interval_s, self.config.lease_ttl_s / 3))
            try:
                if not await self.store.acquire_lease(self.config.instance_id, ttl_ms):
                    log.error("lease_lost", instance=self.config.instance_id)
            except Exception as exc:  # Redis down: keep serving from memory, retry next tick
                log.warning("lease_renew_failed", error=str(exc))
            now = time.monotonic()
            for wid, lane in list(self.lanes.items()):
                if now - lane.last_heartbeat > self.config.heartbeat_ttl_s:
                    # Not awaited: a drop waits for the lane's pending Redis write, which must
                    # not hold up the lease or the other lanes while Redis is down.
                    self.start_drop(wid, reason="heartbeat timeout")

    def spawn(self, coro) -> asyncio.Task:
        """Run ``coro`` in the background, keeping a reference until it ends (asyncio holds
        only weak ones) and logging its failure instead of losing it."""
        return self._track(asyncio.create_task(coro))

    def _track(self, task: asyncio.Task) -> asyncio.Task:
        self._background.add(task)
        task.add_done_callback(self._background_done)
        return task

    def _background_done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background_task_failed", task=task.get_name(), error=repr(task.exception()))

    # -- workers ------------------------------------------------------------------------------
    def _lane_profile(self, desc: dict) -> DeviceProfile:
        """The worker's measured profile if it sent one, else the configured one — with the
        context length the worker actually serves (a prompt the worker cannot hold is refused
        at Submit, not discovered by the worker)."""
        profile = self.profile
        if desc.get("profile_json"):
            try:
                profile = DeviceProfile.from_dict(json.loads(desc["profile_json"]))
            except ValueError as exc:
                log.warning("bad_worker_profile", error=str(exc))
        max_len = int(desc.get("max_model_len") or 0)
        if max_len and max_len != profile.max_model_len:
            profile = dataclasses.replace(profile, max_model_len=max_len)
        return profile

    def _add_lane(self, worker_id: str, desc: dict) -> WorkerLane:
        max_seqs = self.config.max_num_seqs
        if desc.get("max_num_seqs"):
            max_seqs = min(max_seqs, int(desc["max_num_seqs"]))
        self._lane_generation += 1
        lane = WorkerLane(self, worker_id, desc["address"], self._lane_profile(desc), int(desc["num_blocks"]),
                          int(desc["block_size"]), self.config.policy, self.catalog, max_seqs,
                          max_batched_tokens=int(desc.get("max_num_batched_tokens") or 0), description=desc,
                          epoch=f"{self.epoch}.{self._lane_generation}", admission=self.config.admission)
        self.lanes[worker_id] = lane
        lane.start()
        return lane

    async def register_worker(self, worker_id: str, desc: dict) -> None:
        if desc.get("num_blocks", 0) < 2 or desc.get("block_size", 0) < 1:
            raise ServiceError("INVALID_ARGUMENT", "description.num_blocks must be >= 2 and block_size >= 1")
        # Redis first: if it is down the registration is refused (the worker retries) and the
        # lane this worker already has, with its requests, is left exactly as it was.
        try:
            await self.store.register_worker(worker_id, desc, self.config.heartbeat_ttl_s)
        except Exception as exc:
            raise ServiceError("UNAVAILABLE", f"the state store (Redis) is unavailable: {exc}") from None
        existing = self.lanes.get(worker_id)
        if existing is not None and all(existing.description.get(k) == desc.get(k) for k in _SAME_WORKER_KEYS):
            # The same worker back after a blip (say its heartbeats failed while this scheduler
            # started and adopted it from Redis): it still holds what this lane sent it.
            existing.last_heartbeat = time.monotonic()
            log.info("worker_reregistered", worker=worker_id, lane_epoch=existing.epoch)
            return
        if existing is not None:  # changed: a new lane (new epoch), the old one's requests re-queued
            await self.drop_worker(worker_id, reason="re-registered with a new description", remove_from_store=False)
        self._add_lane(worker_id, desc)
        orphans, self.orphans = self.orphans, []
        for r in orphans:
            self._route(r, adopt=True)
        log.info("worker_registered", worker=worker_id, address=desc["address"], blocks=desc["num_blocks"])

    async def heartbeat(self, worker_id: str) -> bool:
        lane = self.lanes.get(worker_id)
        if lane is None:
            return False
        lane.last_heartbeat = time.monotonic()
        # The answer comes from memory. The Redis copy of the TTL is refreshed in the background:
        # a Redis that is down or hanging must not fail or delay the heartbeat, or the worker
        # would re-register and lose its KV state.
        if lane.registry_refresh is None or lane.registry_refresh.done():
            lane.registry_refresh = self.spawn(self._refresh_registry(worker_id))
        return True

    async def _refresh_registry(self, worker_id: str) -> None:
        try:
            await self.store.heartbeat(worker_id, self.config.heartbeat_ttl_s)
        except Exception as exc:
            log.warning("heartbeat_store_failed", worker=worker_id, error=str(exc))

    async def drop_worker(self, worker_id: str, reason: str, remove_from_store: bool = True) -> None:
        """Take the worker's lane away and re-route its unfinished requests. Runs as a task of
        its own: a caller that gives up (an RPC deadline while Redis is slow) cannot stop it
        between taking the lane away and handing its requests on."""
        await asyncio.shield(self.start_drop(worker_id, reason, remove_from_store))

    def start_drop(self, worker_id: str, reason: str, remove_from_store: bool = True) -> asyncio.Task:
        """``drop_worker`` for callers that must not wait for it (the monitor, the lane itself)."""
        return self.spawn(self._drop_worker(worker_id, reason, remove_from_store))

    async def _drop_worker(self, worker_id: str, reason: str, remove_from_store: bool) -> None:
        lane = self.lanes.pop(worker_id, None)
        if lane is None:
            return
        self._dropping[worker_id] = lane  # its requests are still cancellable while it stops
        try:
            await lane.stop()
            moved = lane.core.release_unfinished()
        finally:
            del self._dropping[worker_id]
        for r in moved:
            self._route(r, adopt=True)
        log.warning("worker_dropped", worker=worker_id, reason=reason, requeued=len(moved))
        if remove_from_store:
            try:
                await self.store.remove_worker(worker_id)
            except Exception as exc:  # its alive key expires on its own; the registry entry is inert
                log.warning("remove_worker_store_failed", worker=worker_id, error=str(exc))

    # -- requests -----------------------------------------------------------------------------
    def _pick_lane(self) -> WorkerLane | None:
        return min(self.lanes.values(), key=WorkerLane.load, default=None)

    def _route(self, request: Request, adopt: bool) -> None:
        lane = self._pick_lane()
        if lane is None:
            self.orphans.append(request)
            self.owner.pop(request.request_id, None)
            return
        if adopt:
            lane.core.adopt(request)
        else:
            lane.core.add_request(request)
        self.owner[request.request_id] = lane.worker_id
        lane.wakeup.set()

    def _adopt(self, rec: StoredRequest) -> None:
        r = rec.request
        ch = RequestChannel(request_id=r.request_id, prompt_tokens=r.num_prompt_tokens, tokens=list(r.output_token_ids),
                            times=list(rec.emitted_at))
        self.channels[r.request_id] = ch
        self._route(r, adopt=True)

    def _vocab_size(self) -> int | None:
        """The smallest vocabulary among the workers: a prompt id at or above it would fail the
        whole iteration on some worker (and, re-queued, on the next one)."""
        sizes = [lane.vocab_size for lane in self.lanes.values() if lane.vocab_size]
        return min(sizes) if sizes else None

    def num_unfinished(self) -> int:
        return sum(lane.core.num_unfinished for lane in self.lanes.values()) + len(self.orphans)

    async def submit(self, msg: scheduler_pb2.SubmitRequest) -> Request:
        max_len = min((lane.profile.max_model_len for lane in self.lanes.values()), default=self.profile.max_model_len)
        try:
            request = convert.request_from_submit(msg, self.catalog, max_len, time.time(), self._vocab_size())
        except convert.InvalidInput as exc:
            raise ServiceError("INVALID_ARGUMENT", str(exc)) from None
        if not self.lanes:
            raise ServiceError("UNAVAILABLE", "no worker is registered; start a worker and retry")
        self._check_feasible(request)
        self._check_admission(request)
        if self.num_unfinished() >= self.config.max_queue:
            raise ServiceError("RESOURCE_EXHAUSTED", f"the queue is full ({self.config.max_queue} unfinished "
                                                     "requests); retry later")
        rid = request.request_id
        if rid in self.channels or rid in self.owner or rid in self._accepting:
            raise ServiceError("ALREADY_EXISTS", f"request_id {rid!r} is already in use")
        # Shielded: a client that gives up mid-write leaves the request either wholly accepted
        # (Redis and memory agree; the gateway cancels it) or not at all, never half.
        accept = asyncio.create_task(self._accept(request))
        self._accepting[rid] = accept
        accept.add_done_callback(lambda t: t.cancelled() or t.exception())  # seen even if nobody awaits
        await asyncio.shield(accept)
        return request

    async def _accept(self, request: Request) -> None:
        lane = self._pick_lane()
        try:
            if lane is None:
                raise ServiceError("UNAVAILABLE", "no worker is registered; start a worker and retry")
            try:
                await self.store.add_request(request, lane.worker_id)
            except Exception as exc:
                raise ServiceError("UNAVAILABLE", f"the state store (Redis) is unavailable: {exc}") from None
            self.channels[request.request_id] = RequestChannel(request_id=request.request_id,
                                                               prompt_tokens=request.num_prompt_tokens)
            self._route(request, adopt=False)  # picked again: that worker may have left meanwhile
        finally:
            self._accepting.pop(request.request_id, None)
        if request.request_id in self._cancel_after_accept:
            self._cancel_after_accept.discard(request.request_id)
            self.spawn(self.cancel(request.request_id))

    async def _write_durably(self, changes: IterationChanges) -> None:
        """One store write that must not be lost, retried with backoff while Redis is down."""
        delay = 0.05
        while True:
            try:
                await self.store.commit_iteration(changes)
                return
            except Exception as exc:
                log.warning("commit_retry", worker=changes.worker_id, error=str(exc))
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)

    def _check_feasible(self, request: Request) -> None:
        """An SLO that no worker's profile can meet is refused up front, with the numbers.
        FAILED_PRECONDITION (HTTP 400), not RESOURCE_EXHAUSTED: retrying cannot help while
        these workers serve, and HTTP clients retry a 429 on their own."""
        tbt = request.slo.tbt_s
        if tbt is None:
            return
        fastest = min(lane.profile.forward_time_s(1) for lane in self.lanes.values())
        if tbt < fastest:
            raise ServiceError("FAILED_PRECONDITION",
                               f"the SLO's tbt_ms = {tbt * 1000:g} cannot be met: one decode iteration takes at "
                               f"least {fastest * 1000:.2f} ms on the registered workers; ask for at least "
                               f"{math.ceil(fastest * 1000)} ms or use a looser application class")

    def _check_admission(self, request: Request) -> None:
        """The policy's SLO-aware admission, on the lane the request would go to: a request whose
        first token cannot be on time is refused now (RESOURCE_EXHAUSTED, HTTP 429, with when a
        retry may succeed) instead of missing later and delaying the requests behind it."""
        lane = self._pick_lane()
        if lane is None:
            return
        try:
            lane.core.policy.check_admission(request, time.time())
        except AdmissionRefused as exc:
            raise ServiceError("RESOURCE_EXHAUSTED", str(exc), retry_after_s=exc.retry_after_s) from None

    async def commit(self, lane: WorkerLane, changes, outcome) -> None:
        """Make one iteration durable (one Redis round trip), then publish its tokens."""
        await self._write_durably(changes)  # Redis down: hold the tokens until they are durable
        touched = set()
        for ev in outcome.tokens:
            ch = self.channels.get(ev.request_id)
            if ch is not None and not ch.finished:  # a cancelled request's channel takes no more
                ch.tokens.append(ev.token_id)
                ch.times.append(ev.time_s)
                touched.add(ev.request_id)
        for r in outcome.finished:
            self._close(r.request_id, r.finish_reason.value if r.finish_reason else "")
            lane.core.forget(r.request_id)
            touched.discard(r.request_id)
        for rid in touched:
            self.channels[rid].notify()

    def _close(self, request_id: str, reason: str) -> None:
        self.owner.pop(request_id, None)
        ch = self.channels.get(request_id)
        if ch is None:
            return
        ch.finished = True
        ch.finish_reason = reason
        ch.notify()
        # Keep the channel a while for late watchers; Redis keeps the record longer.
        asyncio.get_running_loop().call_later(60.0, self.channels.pop, request_id, None)

    async def cancel(self, request_id: str) -> bool:
        if request_id in self._accepting:  # a gateway whose client left mid-Submit cancels at once
            self._cancel_after_accept.add(request_id)  # applied as soon as the request is in
            return True
        wid = self.owner.get(request_id)
        lane = (self.lanes.get(wid) or self._dropping.get(wid)) if wid else None
        if lane is None or not lane.core.cancel(request_id, time.time()):
            orphan = next((r for r in self.orphans if r.request_id == request_id), None)
            if orphan is None:
                raise ServiceError("NOT_FOUND", f"request {request_id!r} is not running or waiting")
            self.orphans.remove(orphan)
        if lane is not None:
            lane.core.forget(request_id)
            lane.wakeup.set()
        self._close(request_id, "abort")
        # Everything in memory is done before the first await, so a Cancel whose caller gives up
        # cannot leave it half-done. The record is written in the background, retried while
        # Redis is down; a healthy Redis is waited for, so a GetRequest right after sees it.
        changes = IterationChanges(worker_id=wid or "", status={request_id: ("cancelled", "abort")},
                                   finished=[request_id], freed_tables=[request_id])
        # Behind the lane's own pending writes: one of them may still carry this request's
        # tokens or a "running" status, and Redis must end with "cancelled".
        write = lane.chain_write(self._write_durably(changes)) if lane is not None else \
            self.spawn(self._write_durably(changes))
        self._track(write)
        await asyncio.wait({write}, timeout=1.0)
        if not write.done():
            log.warning("cancel_write_deferred", request=request_id)
        return True

    async def watch(self, request_id: str, start_index: int) -> AsyncIterator[scheduler_pb2.TokenBatch]:
        ch = self.channels.get(request_id)
        if ch is None:
            yield await self.batch_from_store(request_id, start_index)
            return
        idx = start_index
        while True:
            event = ch.event
            end, finished = len(ch.tokens), ch.finished  # one consistent snapshot per batch
            if idx < end or finished:
                yield scheduler_pb2.TokenBatch(token_ids=ch.tokens[idx:end], start_index=idx, emitted_at=ch.times[idx:end],
                                               finished=finished, finish_reason=ch.finish_reason if finished else "",
                                               prompt_tokens=ch.prompt_tokens)
                idx = end
                if finished:
                    return
            await event.wait()

    async def batch_from_store(self, request_id: str, start_index: int) -> scheduler_pb2.TokenBatch:
        """A request with no live channel here: its whole output from Redis if it finished;
        otherwise UNAVAILABLE (it is being recovered after a restart: watch again)."""
        rec = await self.store.load_request(request_id)
        if rec is None:
            raise ServiceError("NOT_FOUND", f"request {request_id!r} is unknown (or expired)")
        r = rec.request
        if not r.status.is_done:
            raise ServiceError("UNAVAILABLE", f"request {request_id!r} is being recovered; watch again")
        return scheduler_pb2.TokenBatch(request_id=request_id, token_ids=r.output_token_ids[start_index:],
                                        start_index=start_index, emitted_at=rec.emitted_at[start_index:],
                                        finished=True, finish_reason=r.finish_reason.value if r.finish_reason else "",
                                        prompt_tokens=r.num_prompt_tokens)

    def watch_many(self, requests: AsyncIterator[scheduler_pb2.WatchManyRequest]
                   ) -> AsyncIterator[scheduler_pb2.WatchManyResponse]:
        """One WatchMany stream (see scheduler_service.watch)."""
        return WatchSession(self).serve(requests)

    def server_info(self) -> scheduler_pb2.ServerInfo:
        lanes = list(self.lanes.values())
        return scheduler_pb2.ServerInfo(
            model=self.profile.name if not lanes else lanes[0].model,
            max_model_len=min((ln.profile.max_model_len for ln in lanes), default=self.profile.max_model_len),
            block_size=lanes[0].core.kv.block_size if lanes else self.profile.block_size,
            live_workers=len(lanes), queued_requests=self.num_unfinished(), policy=self.config.policy,
            app_classes=list(self.catalog.names),
            classes=[scheduler_pb2.AppClass(name=c.name, slo=slo_to_proto(c.slo)) for c in self.catalog.classes],
            vocab_size=self._vocab_size() or 0,
            iterations=sum(ln.stats.iterations for ln in lanes),
            overhead_ms=1000 * sum(ln.stats.overhead_s for ln in lanes) / max(1, len(lanes)),
            **self._decision_percentiles(lanes))

    @staticmethod
    def _decision_percentiles(lanes: list[WorkerLane]) -> dict[str, float]:
        recent = [d for ln in lanes for d in list(ln.stats.decision_s)[-2000:]]
        if not recent:
            return {"sched_ms_p50": 0.0, "sched_ms_p99": 0.0}
        recent.sort()
        pick = lambda q: recent[min(len(recent) - 1, int(q * len(recent)))] * 1000.0  # noqa: E731
        return {"sched_ms_p50": pick(0.5), "sched_ms_p99": pick(0.99)}
