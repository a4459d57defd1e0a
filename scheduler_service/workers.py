"""The worker registry: a lane per registered worker, routing across them, and dropping workers.

- **Routing.** A new (or re-queued) request goes to the lane with the least work left; with no
  lane it waits among the orphans until a worker registers.
- **Registration.** Workers are kept in Redis with a heartbeat TTL. A worker registering again
  with the same address and ``WorkerInfo`` (back after a blip) keeps its lane; a changed one gets
  a fresh lane. Each lane has an epoch of its own (the scheduler's plus a generation), so a
  worker given a fresh lane drops what an older lane left there.
- **Drops.** A worker that stops heart-beating, deregisters, or whose lane ended with a failure
  (the registry watches each lane's task) is dropped: once its lane's pending writes have landed,
  its unfinished requests are adopted by the other lanes and recomputed (outputs so far kept).
"""

from __future__ import annotations

import asyncio
import itertools
import time

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
from scheduler_service.state.store import RedisStore
from scheduler_service.tasks import Background

log = structlog.get_logger("scheduler.workers")


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

    # -- routing ------------------------------------------------------------------------------
    def pick_lane(self) -> WorkerLane | None:
        return min(self.lanes.values(), key=WorkerLane.load, default=None)

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
    def add_lane(self, worker_id: str, address: str, info: WorkerInfo) -> WorkerLane:
        self._generation += 1
        lane = WorkerLane(worker_id, address, info, lane_profile(self.profile, info), self.config, self.catalog,
                          self.committer.chain(), epoch=f"{self.epoch}.{self._generation}")
        self.lanes[worker_id] = lane
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
    async def register(self, worker_id: str, address: str, info: WorkerInfo) -> None:
        problem = worker_info_problem(info)  # bounds what the lane allocates (fuzzing: 2^32 blocks = 18 GB)
        if problem is not None:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, problem)
        # Redis first: if it is down the registration is refused (the worker retries) and the
        # lane this worker already has, with its requests, is left exactly as it was.
        try:
            await self.store.register_worker(worker_id, address, info, self.config.heartbeat_ttl_s)
        except Exception as exc:
            raise store_unavailable(exc) from None
        existing = self.lanes.get(worker_id)
        if existing is not None and existing.same_worker(address, info):
            # The same worker back after a blip (say its heartbeats failed while this scheduler
            # started and adopted it from Redis): it still holds what this lane sent it.
            self._last_heartbeat[worker_id] = time.monotonic()
            log.info("worker_reregistered", worker=worker_id, lane_epoch=existing.epoch)
            return
        if existing is not None:  # changed: a new lane (new epoch), the old one's requests re-queued
            await self.drop(worker_id, reason="re-registered with a new description", remove_from_store=False)
        self.add_lane(worker_id, address, info)
        orphans, self.orphans = self.orphans, []
        for r in orphans:
            self.route(r, adopt=True)
        log.info("worker_registered", worker=worker_id, address=address, blocks=info.num_blocks)

    async def heartbeat(self, worker_id: str) -> bool:
        if worker_id not in self.lanes:
            return False
        self._last_heartbeat[worker_id] = time.monotonic()
        # The answer comes from memory. The Redis copy of the TTL is refreshed in the background:
        # a Redis that is down or hanging must not fail or delay the heartbeat, or the worker
        # would re-register and lose its KV state.
        refresh = self._registry_refresh.get(worker_id)
        if refresh is None or refresh.done():
            self._registry_refresh[worker_id] = self.background.spawn(self._refresh_registry(worker_id))
        return True

    async def _refresh_registry(self, worker_id: str) -> None:
        try:
            await self.store.heartbeat(worker_id, self.config.heartbeat_ttl_s)
        except Exception as exc:
            log.warning("heartbeat_store_failed", worker=worker_id, error=str(exc))

    def drop_silent(self, now: float) -> None:
        """Drop every worker whose last heartbeat is older than the TTL. Not awaited: a drop waits
        for the lane's pending Redis write, which must not hold up the caller while Redis is down."""
        for wid in list(self.lanes):
            if now - self._last_heartbeat.get(wid, now) > self.config.heartbeat_ttl_s:
                self.start_drop(wid, reason="heartbeat timeout")

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
        self._dropping[worker_id] = lane  # its requests are still cancellable while it stops
        try:
            await lane.stop()
            moved = lane.core.release_unfinished()
        finally:
            del self._dropping[worker_id]
        for r in moved:
            self.route(r, adopt=True)
        log.warning("worker_dropped", worker=worker_id, reason=reason, requeued=len(moved))
        if remove_from_store:
            try:
                await self.store.remove_worker(worker_id)
            except Exception as exc:  # its alive key expires on its own; the registry entry is inert
                log.warning("remove_worker_store_failed", worker=worker_id, error=str(exc))
