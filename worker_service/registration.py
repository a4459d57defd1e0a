"""Keeping this worker in the scheduler's registry: register, heartbeat, re-register, leave.

The scheduler's registry lives in Redis with a TTL per worker, so a worker proves it is alive
by heartbeating. Two events mean the scheduler no longer knows us — a heartbeat answered
``known=False`` (the entry expired, or a new scheduler started with an empty view) and a
heartbeat that failed (the scheduler was down; it may have come back without us) — and both
lead to registering again with the full description. Registration retries with exponential
backoff until the scheduler answers; every call carries a deadline so a hung scheduler cannot
stall the loop.

Registering does not reset the executor. Plans carry their lane's epoch and the worker resets
on the first plan of a new one (server.PlanRunner), so a scheduler that gives this worker a
fresh lane also gives it a clean slate, and one that keeps the lane (same worker back after a
blip) finds the requests it sent still there.

``on_change(registered)`` hears every change of ``registered``: the worker is *ready* (gRPC
health) only while a scheduler knows it. The scheduler address may be a list (leader and
standbys, ``accelgen.common.grpc_server.channel_target``): after a failed heartbeat the channel
tries them again in order and registration reaches whichever scheduler now listens, the leader.

**Drain.** ``request_drain`` asks the scheduler to route this worker nothing new (SIGTERM); an
operator's ``accelgen drain`` does the same from outside, and the heartbeat answers say so either
way (``draining``). From then on the worker never registers again (a registration could bring it
new requests) and only heart-beats, to follow the drain: ``drained`` is set once the scheduler
says none of its requests is left, or that it forgot the worker (the grace period ended and what
was left went to other workers).
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import grpc
import structlog

from accelgen.common.grpc_server import FailoverChannel
from accelgen.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

log = structlog.get_logger(service="worker")

DEFAULT_HEARTBEAT_INTERVAL_S = 1.0  # used when the scheduler's answer leaves it unset
INITIAL_BACKOFF_S = 0.1


class Registration:
    """The register/heartbeat loop of one worker. ``start()`` it, ``stop()`` it (deregisters)."""

    def __init__(
        self,
        stub: scheduler_pb2_grpc.SchedulerStub,
        worker_id: str,
        address: str,
        description: common_pb2.WorkerDescription,
        rpc_timeout_s: float = 2.0,
        backoff_max_s: float = 5.0,
        on_change: Callable[[bool], Awaitable[None]] | None = None,
        failover: FailoverChannel | None = None,
    ) -> None:
        self._stub = stub
        self._failover = failover  # several scheduler addresses: move on from one that stops answering
        self.worker_id = worker_id
        self.address = address
        self.description = description
        self.rpc_timeout_s = rpc_timeout_s
        self.backoff_max_s = backoff_max_s
        self.heartbeat_interval_s = DEFAULT_HEARTBEAT_INTERVAL_S
        self.registered = asyncio.Event()  # set while the scheduler is believed to know us
        self.on_change = on_change
        self.num_registrations = 0
        self.heartbeat_ttl_s = 0.0  # the scheduler's, once registered (0: unknown)
        self.draining = asyncio.Event()  # the scheduler routes us nothing new (see the module doc)
        self.drained = asyncio.Event()  # ... and runs nothing on us any more
        self.assigned = 0  # while draining: unfinished requests the scheduler still runs here
        self.drain_left_s = 0.0  # while draining: of the grace period, at the last answer
        self._left = False  # deregistered
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"registration-{self.worker_id}")

    async def stop(self, deregister: bool = True) -> None:
        """End the loop, then tell the scheduler we are leaving (best effort, with a deadline)."""
        self._stop.set()
        if self._task is not None:
            await self._task
        if deregister and self.num_registrations and not self._left:
            self._left = True
            try:
                await self._stub.DeregisterWorker(scheduler_pb2.DeregisterWorkerRequest(worker_id=self.worker_id),
                                                  timeout=self.rpc_timeout_s)
                log.info("deregistered", worker=self.worker_id)
            except grpc.aio.AioRpcError as exc:  # the scheduler's TTL will expire us instead
                log.warning("deregister_failed", worker=self.worker_id, code=exc.code().name, error=exc.details())
        await self._set_registered(False)

    # -- the loop --------------------------------------------------------------------------
    async def _loop(self) -> None:
        backoff = INITIAL_BACKOFF_S
        while not self._stop.is_set():
            if not self.registered.is_set() and not self.draining.is_set():
                if await self._register():
                    backoff = INITIAL_BACKOFF_S
                else:
                    await self._sleep(backoff)
                    backoff = min(backoff * 2, self.backoff_max_s)
                continue
            if await self._sleep(self.heartbeat_interval_s):
                break
            await self._heartbeat()

    async def _register(self) -> bool:
        request = scheduler_pb2.RegisterWorkerRequest(worker_id=self.worker_id, address=self.address,
                                                      description=self.description)
        try:
            response = await self._stub.RegisterWorker(request, timeout=self.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            log.warning("register_failed", worker=self.worker_id, code=exc.code().name, error=exc.details())
            self._call_failed(exc)
            return False
        if response.heartbeat_interval_s > 0:
            self.heartbeat_interval_s = response.heartbeat_interval_s
        self.heartbeat_ttl_s = response.heartbeat_ttl_s
        if 0 < response.heartbeat_ttl_s <= self.heartbeat_interval_s:
            log.warning("heartbeat_slower_than_ttl", interval_s=self.heartbeat_interval_s,
                        ttl_s=response.heartbeat_ttl_s)
        self.num_registrations += 1
        if self._failover is not None:
            self._failover.succeeded()
        await self._set_registered(True)
        log.info("registered", worker=self.worker_id, address=self.address,
                 heartbeat_interval_s=self.heartbeat_interval_s, ttl_s=response.heartbeat_ttl_s)
        return True

    async def _heartbeat(self) -> None:
        try:
            response = await self._stub.Heartbeat(scheduler_pb2.HeartbeatRequest(worker_id=self.worker_id),
                                                  timeout=self.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            log.warning("heartbeat_failed", worker=self.worker_id, code=exc.code().name, error=exc.details())
            self._call_failed(exc)
            await self._set_registered(False)  # it may come back without us (or a standby took over)
            return
        if self._failover is not None:
            self._failover.succeeded()
        if response.draining or (self.draining.is_set() and response.known):
            self._follow_drain(response.assigned, response.drain_left_s)
        if not response.known:
            log.info("scheduler_forgot_worker", worker=self.worker_id, draining=self.draining.is_set())
            if self.draining.is_set():
                self.drained.set()  # what was left went to other workers: nothing runs here any more
            await self._set_registered(False)

    # -- drain ---------------------------------------------------------------------------------
    async def request_drain(self, grace_s: float, attempts: int = 3) -> bool:
        """Ask the scheduler to drain this worker (DrainWorker). False if it could not be asked (no
        scheduler answers, it knows no DrainWorker, or it does not know this worker): the caller
        then stops at once, as before drains existed."""
        if not self.num_registrations:
            return False
        request = scheduler_pb2.DrainWorkerRequest(worker_id=self.worker_id, grace_s=grace_s)
        for attempt in range(attempts):
            try:
                response = await self._stub.DrainWorker(request, timeout=self.rpc_timeout_s)
            except grpc.aio.AioRpcError as exc:
                log.warning("drain_request_failed", worker=self.worker_id, code=exc.code().name, error=exc.details())
                self._call_failed(exc)
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    return False
                if attempt + 1 < attempts:
                    await asyncio.sleep(INITIAL_BACKOFF_S * 2 ** attempt)
                continue
            self._follow_drain(response.assigned, response.drain_left_s)
            return True
        return False

    def _follow_drain(self, assigned: int, left_s: float) -> None:
        if not self.draining.is_set():
            log.info("draining", worker=self.worker_id, assigned=assigned, grace_left_s=round(left_s, 3))
            self.draining.set()
        self.assigned = assigned
        self.drain_left_s = left_s
        if assigned == 0:
            self.drained.set()

    async def _set_registered(self, registered: bool) -> None:
        """Change ``registered`` and tell ``on_change``; whoever sees the event set also sees the
        worker ready (the callback runs first on the way up, last on the way down)."""
        if registered == self.registered.is_set():
            return
        if not registered:
            self.registered.clear()
        if self.on_change is not None:
            await self.on_change(registered)
        if registered:
            self.registered.set()

    def _call_failed(self, exc: grpc.aio.AioRpcError) -> None:
        if self._failover is None or exc.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
            return
        if self._failover.failed():
            self._stub = scheduler_pb2_grpc.SchedulerStub(self._failover.channel)
            log.warning("scheduler_channel_rotated", worker=self.worker_id, generation=self._failover.generation)

    async def _sleep(self, seconds: float) -> bool:
        """Sleep, waking early on stop; True if stopping."""
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            return False
        return True
