"""The worker registry: a lane per registered worker, routing across them, and dropping workers.

- **Routing.** A new (or re-queued) request goes to the lane with the least work left; with no
  lane it waits among the orphans until a worker registers.
- **Registration.** Workers are kept in Redis with a heartbeat TTL. A worker registering again
  with the same address and ``WorkerInfo`` (back after a blip) keeps its lane; a changed one gets
  a fresh lane. Each lane has an epoch of its own (the scheduler's plus a generation), so a
  worker given a fresh lane drops what an older lane left there.
- **Ownership.** A worker id belongs to the certificate that registered it (its *identity*,
  ``worker_identity``; ``""`` for plaintext callers, which binds nothing) for as long as its
  worker is live: a registration, heartbeat or deregistration of that id with another
  certificate is refused (PERMISSION_DENIED), so one worker certificate cannot take over,
  keep alive or drop another worker's lane. Once the holder is dropped (deregistered, silent
  past the TTL) the id is free. The identity is kept in Redis with the worker, so a restarted
  scheduler keeps the binding; a lane with no identity (a record written before identities were
  kept, or by a plaintext scheduler) is adopted by the first certificate that registers or
  heart-beats for it.
- **Bound.** At most ``max_workers`` worker ids are registered at once: each lane allocates
  block accounting for up to 2^20 blocks, so an unbounded registry is a memory exhaustion.
- **Drains.** A draining worker (``drain``: its own SIGTERM, or an operator's ``accelgen drain``)
  is routed no new request; those it has not started go at once to the other workers, as new
  requests (``drain_moved``: nothing was computed, nothing is recomputed), and the ones it started
  run to the end; past the grace period the rest are handed over as for a dropped worker
  (recomputed elsewhere) and it is dropped. The
  drain's deadline is in Redis with the registry, so a scheduler that takes over keeps it; the
  worker follows it through its heartbeats (``drain_state``) and deregisters once it has none.
- **Drops.** A worker that stops heart-beating, deregisters, or whose lane ended with a failure
  (the registry watches each lane's task) is dropped: once its lane's pending writes have landed,
  its unfinished requests are adopted by the other lanes and recomputed (outputs so far kept).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass

import grpc
import structlog

from accelgen.core.profile import DeviceProfile
from accelgen.core.request import Request
from accelgen.core.slo import SLOCatalog
from accelgen.core.worker_info import WorkerInfo
from accelgen.wire.worker_info import worker_info_problem
from scheduler_service.committer import Committer
from scheduler_service.config import SchedulerConfig
from scheduler_service.errors import ServiceError, store_unavailable
from scheduler_service.lane import WorkerLane, lane_profile
from scheduler_service.metrics import SchedulerMetrics
from scheduler_service.state.store import RedisStore
from scheduler_service.tasks import Background

log = structlog.get_logger("scheduler.workers")

DEFAULT_DRAIN_GRACE_S = 30.0  # a DrainWorker that names no grace period
MAX_DRAIN_GRACE_S = 7 * 24 * 3600.0


@dataclass(frozen=True)
class DrainState:
    """What a draining worker (or its operator) is told: requests left and seconds left."""

    draining: bool
    assigned: int = 0  # unfinished requests still on the worker
    left_s: float = 0.0  # of the grace period


class WorkerRegistry:
    def __init__(self, config: SchedulerConfig, store: RedisStore, committer: Committer, background: Background,
                 profile: DeviceProfile, catalog: SLOCatalog, epoch: str) -> None:
        self.config = config
        self.store = store
        self.committer = committer
        self.background = background
        self.profile = profile  # used for a worker that sent no measured profile
        self.catalog = catalog
        self.epoch = epoch
        self._generation = 0  # lane epochs are f"{epoch}.{generation}"
        self.lanes: dict[str, WorkerLane] = {}
        self.orphans: list[Request] = []  # unfinished requests with no live worker to run them
        self._dropping: dict[str, WorkerLane] = {}  # lanes being stopped, until their requests move on
        self._last_heartbeat: dict[str, float] = {}  # worker id -> time.monotonic() of its last sign
        self._registry_refresh: dict[str, asyncio.Task] = {}  # the heartbeat's TTL write to Redis, if in flight
        self._identity: dict[str, str] = {}  # worker id -> the certificate holding it ("": none yet)
        self._draining: dict[str, float] = {}  # worker id -> wall-clock end of its drain's grace period
        self._registering = asyncio.Lock()  # one registration at a time: its checks hold until its lane exists
        self.metrics = SchedulerMetrics()  # the app's replaces it (scheduler_service/metrics.py)

    # -- routing ------------------------------------------------------------------------------
    def pick_lane(self) -> WorkerLane | None:
        """The least-loaded lane that takes new requests (a draining worker takes none)."""
        return min((lane for wid, lane in self.lanes.items() if wid not in self._draining), key=WorkerLane.load,
                   default=None)

    def route(self, request: Request, adopt: bool) -> None:
        """Hand ``request`` to the least-loaded lane (``adopt``: it ran before, recompute it)."""
        lane = self.pick_lane()
        if lane is None:
            self.orphans.append(request)
            return
        if adopt:
            lane.core.adopt(request)
        else:
            lane.core.add_request(request)
        lane.wakeup.set()

    def lane_of(self, request_id: str) -> WorkerLane | None:
        """The lane (live, or being dropped) that holds the unfinished request, if any."""
        for lane in itertools.chain(self.lanes.values(), self._dropping.values()):
            r = lane.core.requests.get(request_id)
            if r is not None and not r.status.is_done:
                return lane
        return None

    def worker_of(self, request_id: str) -> str | None:
        lane = self.lane_of(request_id)
        return lane.worker_id if lane is not None else None

    def take_orphan(self, request_id: str) -> Request | None:
        orphan = next((r for r in self.orphans if r.request_id == request_id), None)
        if orphan is not None:
            self.orphans.remove(orphan)
        return orphan

    def num_unfinished(self) -> int:
        return sum(lane.core.num_unfinished for lane in self.lanes.values()) + len(self.orphans)

    def vocab_size(self) -> int | None:
        """The smallest vocabulary among the workers: a prompt id at or above it would fail the
        whole iteration on some worker (and, re-queued, on the next one)."""
        sizes = [lane.vocab_size for lane in self.lanes.values() if lane.vocab_size]
        return min(sizes) if sizes else None

    def max_model_len(self) -> int:
        return min((lane.profile.max_model_len for lane in self.lanes.values()), default=self.profile.max_model_len)

    # -- lanes --------------------------------------------------------------------------------
    def add_lane(self, worker_id: str, address: str, info: WorkerInfo, identity: str = "",
                 draining_until: float = 0.0) -> WorkerLane:
        """A fresh lane; ``draining_until`` (wall clock): a drain recovered from Redis."""
        self._generation += 1
        if draining_until:
            self._draining[worker_id] = draining_until
        else:
            self._draining.pop(worker_id, None)
        lane = WorkerLane(worker_id, address, info, lane_profile(self.profile, info), self.config, self.catalog,
                          self.committer.chain(), epoch=f"{self.epoch}.{self._generation}")
        self.lanes[worker_id] = lane
        lane.metrics = self.metrics.lane(worker_id)
        self._identity[worker_id] = identity
        self._last_heartbeat[worker_id] = time.monotonic()
        lane.start().add_done_callback(lambda _task: self._lane_ended(lane))
        return lane

    def _lane_ended(self, lane: WorkerLane) -> None:
        """A lane's loop ended. Stopped by a drop: nothing to do. Failed: drop its worker, without
        waiting (the drop waits for the lane's pending writes, which may wait for Redis)."""
        task = lane.task
        reason = lane.failure
        if reason is None and task is not None and not task.cancelled() and task.exception() is not None:
            reason = f"lane failed: {task.exception()!r}"
            log.error("lane_failed", worker=lane.worker_id, error=repr(task.exception()))
        if reason is not None and self.lanes.get(lane.worker_id) is lane:
            self.start_drop(lane.worker_id, reason=reason)

    async def stop(self, commit_timeout_s: float) -> None:
        for lane in list(self.lanes.values()):
            await lane.stop(commit_timeout_s=commit_timeout_s)

    # -- registration -------------------------------------------------------------------------
    def _check_holder(self, worker_id: str, identity: str) -> None:
        """PERMISSION_DENIED if a live worker holds ``worker_id`` with another certificate."""
        held = self._identity.get(worker_id, "") if worker_id in self.lanes else ""
        if held and held != identity:
            log.warning("worker_id_claimed_by_another_certificate", worker=worker_id, holder=held[:16],
                        caller=identity[:16] or "(none)")
            raise ServiceError(grpc.StatusCode.PERMISSION_DENIED,
                               f"worker id {worker_id} is registered with another certificate; it is free again "
                               "once that worker deregisters or stops heart-beating")

    def _check_room(self, worker_id: str) -> None:
        """RESOURCE_EXHAUSTED if ``worker_id`` is new and ``max_workers`` are registered already."""
        if worker_id not in self.lanes and len(self.lanes) >= self.config.max_workers:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"cannot register worker {worker_id}: {len(self.lanes)} workers are registered "
                               f"already, the scheduler's max_workers = {self.config.max_workers}; deregister one "
                               "or raise max_workers")

    async def register(self, worker_id: str, address: str, info: WorkerInfo, identity: str = "") -> None:
        """Register (or re-register) ``worker_id``, called with the certificate ``identity``."""
        problem = worker_info_problem(info)  # bounds what the lane allocates (fuzzing: 2^32 blocks = 18 GB)
        if problem is not None:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, problem)
        if self.config.plaintext_to(address):  # a local caller must not make us send plans in clear
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"worker address {address} is not loopback and this scheduler runs plaintext gRPC "
                               "for loopback only: start the scheduler with --tls-dir DIR (or --insecure)")
        async with self._registering:  # checked and done as one: two callers cannot both pass the checks
            # Before Redis: a refused caller must not overwrite the holder's record there either.
            self._check_holder(worker_id, identity)
            self._check_room(worker_id)
            await self._register(worker_id, address, info, identity)

    async def _register(self, worker_id: str, address: str, info: WorkerInfo, identity: str) -> None:
        # Redis first: if it is down the registration is refused (the worker retries) and the
        # lane this worker already has, with its requests, is left exactly as it was.
        existing = self.lanes.get(worker_id)
        kept_drain = self._draining.get(worker_id, 0.0) if existing and existing.same_worker(address, info) else 0.0
        try:  # the same worker back keeps its drain; a new one starts undrained
            await self.store.register_worker(worker_id, address, info, self.config.heartbeat_ttl_s, identity,
                                             draining_until=kept_drain)
        except Exception as exc:
            raise store_unavailable(exc) from None
        existing = self.lanes.get(worker_id)  # its lane may have failed and been dropped meanwhile
        if existing is not None and existing.same_worker(address, info):
            # The same worker back after a blip (say its heartbeats failed while this scheduler
            # started and adopted it from Redis): it still holds what this lane sent it.
            self._last_heartbeat[worker_id] = time.monotonic()
            self._identity[worker_id] = identity or self._identity.get(worker_id, "")
            log.info("worker_reregistered", worker=worker_id, lane_epoch=existing.epoch)
            return
        if existing is not None:  # changed: a new lane (new epoch), the old one's requests re-queued
            await self.drop(worker_id, reason="re-registered with a new description", remove_from_store=False)
        self.add_lane(worker_id, address, info, identity)
        if kept_drain:  # written for the lane dropped meanwhile: the new one is not draining
            self._registry_refresh[worker_id] = self.background.spawn(self._refresh_registry(worker_id, rewrite=True))
        orphans, self.orphans = self.orphans, []
        for r in orphans:
            self.route(r, adopt=True)
        log.info("worker_registered", worker=worker_id, address=address, blocks=info.num_blocks)

    async def heartbeat(self, worker_id: str, identity: str = "") -> bool:
        """Whether ``worker_id`` is registered here (False: the worker registers again)."""
        if worker_id not in self.lanes:
            return False
        self._check_holder(worker_id, identity)
        self._last_heartbeat[worker_id] = time.monotonic()
        bind = bool(identity) and not self._identity.get(worker_id)
        if bind:  # an unbound lane (adopted from an old record): its worker's certificate takes it
            self._identity[worker_id] = identity
            log.info("worker_identity_bound", worker=worker_id, identity=identity[:16])
        # The answer comes from memory. The Redis copy of the TTL is refreshed in the background:
        # a Redis that is down or hanging must not fail or delay the heartbeat, or the worker
        # would re-register and lose its KV state.
        refresh = self._registry_refresh.get(worker_id)
        if bind or refresh is None or refresh.done():
            self._registry_refresh[worker_id] = self.background.spawn(self._refresh_registry(worker_id, bind))
        return True

    async def deregister(self, worker_id: str, identity: str = "") -> None:
        """Drop ``worker_id`` at its worker's request; a call with another certificate is refused."""
        self._check_holder(worker_id, identity)
        await self.drop(worker_id, reason="deregistered")

    async def _refresh_registry(self, worker_id: str, rewrite: bool = False) -> None:
        """The TTL in Redis; with ``rewrite`` the whole record, to persist a newly bound identity."""
        lane = self.lanes.get(worker_id)
        try:
            if rewrite and lane is not None:
                await self.store.register_worker(worker_id, lane.address, lane.info, self.config.heartbeat_ttl_s,
                                                 self._identity.get(worker_id, ""),
                                                 draining_until=self._draining.get(worker_id, 0.0))
            else:
                await self.store.heartbeat(worker_id, self.config.heartbeat_ttl_s)
        except Exception as exc:
            log.warning("heartbeat_store_failed", worker=worker_id, error=str(exc))

    def drop_silent(self, now: float) -> None:
        """Drop every worker whose last heartbeat is older than the TTL. Not awaited: a drop waits
        for the lane's pending Redis write, which must not hold up the caller while Redis is down."""
        for wid in list(self.lanes):
            if now - self._last_heartbeat.get(wid, now) > self.config.heartbeat_ttl_s:
                self.start_drop(wid, reason="heartbeat timeout")
        self.hand_over_drained(time.time())

    # -- drains -------------------------------------------------------------------------------
    async def drain(self, worker_id: str, grace_s: float, identity: str = "", operator: bool = False) -> DrainState:
        """Route ``worker_id`` no new request, move the requests it has not started to other
        workers now, and hand what it still runs after ``grace_s`` (0: the default) to them. A
        worker drains only itself (its certificate must hold the id); an ``operator`` (the
        gateway role: ``accelgen drain``) any worker. Durable before it returns.
        A second drain keeps the earlier deadline if that is sooner."""
        if not 0 <= grace_s <= MAX_DRAIN_GRACE_S:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"grace_s must be in [0, {MAX_DRAIN_GRACE_S:g}] seconds (0 = {DEFAULT_DRAIN_GRACE_S:g}), "
                               f"got {grace_s:g}")
        if worker_id not in self.lanes:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"worker {worker_id!r} is not registered with this "
                               "scheduler (it left, or its id is spelt otherwise: see the workers' logs)")
        if not operator:
            self._check_holder(worker_id, identity)
        now = time.time()
        until = min(self._draining.get(worker_id, float("inf")), now + (grace_s or DEFAULT_DRAIN_GRACE_S))
        try:
            await self.store.set_draining(worker_id, until)
        except Exception as exc:
            raise store_unavailable(exc) from None
        lane = self.lanes.get(worker_id)
        if lane is None:  # dropped while Redis answered: nothing left to drain
            return DrainState(draining=False)
        if worker_id not in self._draining:
            log.info("worker_draining", worker=worker_id, grace_s=round(until - now, 3),
                     assigned=lane.core.num_unfinished,
                     by="operator" if operator else "worker" if identity else "plaintext caller")
        self._draining[worker_id] = until
        self._move_unstarted(lane)
        return self.drain_state(worker_id, now)

    def _move_unstarted(self, lane: WorkerLane) -> int:
        """Route the requests the draining ``lane`` never started to the other workers now, as new
        requests: nothing was computed for them, so nothing is lost or recomputed, and the worker
        only finishes what it started (it leaves sooner). With no other lane they stay and run
        there. Redis needs no write: their records say waiting, with no output, whichever worker
        runs them (``worker`` there is the one the Submit picked, as after a drop's hand-over),
        and a scheduler that takes over re-routes every live request anyway."""
        if self.pick_lane() is None:
            return 0
        moved = 0
        for r in lane.core.take_unstarted():
            target = self.pick_lane()
            if target is not None:
                try:
                    target.core.add_request(r)
                    target.wakeup.set()
                    moved += 1
                    continue
                except ValueError:  # that worker's context is too short for the prompt
                    pass
            lane.core.add_request(r)  # it runs here after all
        log.info("drain_moved", worker=lane.worker_id, moved=moved, assigned=lane.core.num_unfinished)
        return moved

    def drain_state(self, worker_id: str, now: float | None = None) -> DrainState:
        """The drain of ``worker_id`` (not draining: ``draining`` False)."""
        lane = self.lanes.get(worker_id)
        until = self._draining.get(worker_id)
        if lane is None or until is None:
            return DrainState(draining=False, assigned=lane.core.num_unfinished if lane is not None else 0)
        now = time.time() if now is None else now
        return DrainState(draining=True, assigned=lane.core.num_unfinished, left_s=max(0.0, until - now))

    def hand_over_drained(self, now: float) -> None:
        """Drop every draining worker past its grace period: what it still runs goes to the
        other workers (recomputed there), and its next heartbeat hears it is forgotten."""
        for wid, until in list(self._draining.items()):
            if wid in self.lanes and now >= until:
                log.warning("drain_grace_ended", worker=wid, handed_over=self.lanes[wid].core.num_unfinished)
                self.start_drop(wid, reason="drain grace period ended")

    # -- drops --------------------------------------------------------------------------------
    async def drop(self, worker_id: str, reason: str, remove_from_store: bool = True) -> None:
        """Take the worker's lane away and re-route its unfinished requests. Runs as a task of
        its own: a caller that gives up (an RPC deadline while Redis is slow) cannot stop it
        between taking the lane away and handing its requests on."""
        await asyncio.shield(self.start_drop(worker_id, reason, remove_from_store))

    def start_drop(self, worker_id: str, reason: str, remove_from_store: bool = True) -> asyncio.Task:
        """``drop`` for callers that must not wait for it."""
        return self.background.spawn(self._drop(worker_id, reason, remove_from_store))

    async def _drop(self, worker_id: str, reason: str, remove_from_store: bool) -> None:
        lane = self.lanes.pop(worker_id, None)
        if lane is None:
            return
        self._last_heartbeat.pop(worker_id, None)
        self._registry_refresh.pop(worker_id, None)
        self._identity.pop(worker_id, None)  # the id is free again
        self._draining.pop(worker_id, None)
        self._dropping[worker_id] = lane  # its requests are still cancellable while it stops
        try:
            await lane.stop()
            moved = lane.core.release_unfinished()
        finally:
            del self._dropping[worker_id]
        for r in moved:
            self.route(r, adopt=True)
        # A worker that left on its own with nothing running is routine (a drain, a stop); anything
        # else (silent, failed, or requests to recompute) is what an operator should see.
        quiet = reason == "deregistered" and not moved
        (log.info if quiet else log.warning)("worker_dropped", worker=worker_id, reason=reason, requeued=len(moved))
        if remove_from_store:
            try:
                await self.store.remove_worker(worker_id)
            except Exception as exc:  # its alive key expires on its own; the registry entry is inert
                log.warning("remove_worker_store_failed", worker=worker_id, error=str(exc))
