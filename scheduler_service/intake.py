"""Requests in and out: Submit (validation, feasibility, SLO-aware admission, the durable accept,
routing) and Cancel.

A Submit is refused before anything is written when it is malformed (INVALID_ARGUMENT), when its id
is taken (ALREADY_EXISTS: a request here, or a record in Redis, finished ones included), when no
worker could meet its SLO (FAILED_PRECONDITION), when the policy's admission says its first token
cannot be on time (RESOURCE_EXHAUSTED with a retry hint), or when the queue is full. An accepted
request is in Redis before its Submit returns; a Cancel takes effect in memory at once, and its
record follows the lane's pending writes.
"""

from __future__ import annotations

import asyncio
import math
import time

import grpc
import structlog

from accelgen.core.admission import AdmissionRefused
from accelgen.core.request import FinishReason, Request, RequestStatus
from accelgen.core.slo import SLOCatalog
from accelgen.v1 import scheduler_pb2
from scheduler_service import convert
from scheduler_service.committer import Committer
from scheduler_service.config import SchedulerConfig
from scheduler_service.delivery import Delivery
from scheduler_service.errors import ServiceError, store_unavailable
from scheduler_service.metrics import SchedulerMetrics
from scheduler_service.state.store import IterationChanges, RedisStore, RequestIdTaken, truncation
from scheduler_service.tasks import Background
from scheduler_service.lane import WorkerLane
from scheduler_service.workers import WorkerRegistry

log = structlog.get_logger("scheduler.intake")


def _no_worker() -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, "no worker takes new requests (none is registered, or every "
                        "one is draining); start a worker and retry")


class RequestIntake:
    def __init__(self, config: SchedulerConfig, store: RedisStore, catalog: SLOCatalog, workers: WorkerRegistry,
                 committer: Committer, delivery: Delivery, background: Background) -> None:
        self.config = config
        self.store = store
        self.catalog = catalog
        self.workers = workers
        self.committer = committer
        self.delivery = delivery
        self.background = background
        self._accepting: dict[str, asyncio.Task] = {}  # request id -> its Submit's write to Redis
        self._cancel_after_accept: set[str] = set()  # cancelled while their Submit was being written
        self.metrics = SchedulerMetrics()  # the app's replaces it (scheduler_service/metrics.py)

    async def submit(self, msg: scheduler_pb2.SubmitRequest) -> Request:
        try:
            return await self._submit(msg)
        except ServiceError as exc:  # every refused Submit, by class and status
            self.metrics.refused_submit(msg.app_class, exc.code.name)
            raise

    async def _submit(self, msg: scheduler_pb2.SubmitRequest) -> Request:
        workers = self.workers
        try:
            request = convert.request_from_submit(msg, self.catalog, workers.max_model_len(), time.time(),
                                                  workers.vocab_size())
            tenant, label = convert.submit_tags(msg)
            stop = convert.submit_stop(msg)
        except convert.InvalidInput as exc:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        if not workers.lanes:
            raise _no_worker()
        self._check_feasible(request)
        self._check_admission(request)
        if workers.num_unfinished() >= self.config.max_queue:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the queue is full ({self.config.max_queue} unfinished requests); retry later")
        rid = request.request_id
        # Every routed request has a channel (kept a while after it finished).
        if rid in self.delivery.channels or rid in self._accepting:
            raise ServiceError(grpc.StatusCode.ALREADY_EXISTS, f"request_id {rid!r} is already in use")
        # Shielded: a client that gives up mid-write leaves the request either wholly accepted
        # (Redis and memory agree; the gateway cancels it) or not at all, never half.
        accept = asyncio.create_task(self._accept(request, msg.owner, tenant, label, stop,
                                                  msg.include_stop_str_in_output))
        self._accepting[rid] = accept
        accept.add_done_callback(lambda t: t.cancelled() or t.exception())  # seen even if nobody awaits
        await asyncio.shield(accept)
        return request

    async def _accept(self, request: Request, owner: str = "", tenant: str = "", label: str = "",
                      stop: tuple[str, ...] = (), include_stop: bool = False) -> None:
        lane = self.workers.pick_lane()
        try:
            if lane is None:
                raise _no_worker()
            try:
                await self.store.add_request(request, lane.worker_id, tenant=tenant, label=label, stop=stop,
                                             include_stop=include_stop)
            except RequestIdTaken as exc:  # finished here long ago (its channel gone), or before a restart
                raise ServiceError(grpc.StatusCode.ALREADY_EXISTS, str(exc)) from None
            except Exception as exc:
                raise store_unavailable(exc) from None
            self.delivery.open(request.request_id, request.num_prompt_tokens)
            self.delivery.owners.submitted(request.request_id, owner)  # cancelled if its gateway goes
            self.metrics.accepted(request)
            self.workers.route(request, adopt=False)  # picked again: that worker may have left meanwhile
        finally:
            self._accepting.pop(request.request_id, None)
        if request.request_id in self._cancel_after_accept:
            self._cancel_after_accept.discard(request.request_id)
            self.background.spawn(self.cancel(request.request_id))

    def _check_feasible(self, request: Request) -> None:
        """An SLO that no worker's profile can meet is refused up front, with the numbers.
        FAILED_PRECONDITION (HTTP 400), not RESOURCE_EXHAUSTED: retrying cannot help while
        these workers serve, and HTTP clients retry a 429 on their own."""
        tbt = request.slo.tbt_s
        if tbt is None:
            return
        fastest = min(lane.profile.forward_time_s(1) for lane in self.workers.lanes.values())
        if tbt < fastest:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"the SLO's tbt_ms = {tbt * 1000:g} cannot be met: one decode iteration takes at "
                               f"least {fastest * 1000:.2f} ms on the registered workers; ask for at least "
                               f"{math.ceil(fastest * 1000)} ms or use a looser application class")

    def _check_admission(self, request: Request) -> None:
        """The policy's SLO-aware admission, on the lane the request would go to: a request whose
        first token cannot be on time is refused now (RESOURCE_EXHAUSTED, HTTP 429, with when a
        retry may succeed) instead of missing later and delaying the requests behind it."""
        lane = self.workers.pick_lane()
        if lane is None:
            return
        try:
            lane.core.policy.check_admission(request, time.time())
        except AdmissionRefused as exc:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), retry_after_s=exc.retry_after_s) from None

    async def cancel(self, request_id: str, finish_reason: str = "", keep: int | None = None) -> bool:
        """Cancel a request; with ``finish_reason`` "stop" (a gateway's stop string), finish it
        instead with its first ``keep`` output tokens (``_finish_stopped``)."""
        if finish_reason == FinishReason.STOP.value:
            if keep is None:
                raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                                   "finish_reason \"stop\" needs keep_output_tokens (the tokens up to and including "
                                   "the one that completed the stop string)")
            return await self._finish_stopped(request_id, keep)
        if finish_reason not in ("", FinishReason.CANCELLED.value) or keep is not None:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"a Cancel's finish_reason may be \"\", \"abort\" or \"stop\" (with keep_output_tokens), "
                               f"got {finish_reason[:32]!r}" + (" with keep_output_tokens" if keep is not None else ""))
        if request_id in self._accepting:  # a gateway whose client left mid-Submit cancels at once
            self._cancel_after_accept.add(request_id)  # applied as soon as the request is in
            return True
        lane = self.workers.lane_of(request_id)
        if lane is None or not lane.core.cancel(request_id, time.time()):
            if self.workers.take_orphan(request_id) is None:
                raise ServiceError(grpc.StatusCode.NOT_FOUND, f"request {request_id!r} is not running or waiting")
        if lane is not None:
            lane.core.forget(request_id)
            lane.wakeup.set()
        self.delivery.close(request_id, FinishReason.CANCELLED.value)
        self.metrics.cancelled_request(request_id)
        # Everything in memory is done before the first await, so a Cancel whose caller gives up
        # cannot leave it half-done. The record is written in the background, retried while
        # Redis is down; a healthy Redis is waited for, so a GetRequest right after sees it.
        changes = IterationChanges(worker_id=lane.worker_id if lane is not None else "",
                                   status={request_id: (RequestStatus.CANCELLED, FinishReason.CANCELLED.value)},
                                   finished=[request_id])
        await self._record(lane, changes, request_id)
        return True

    async def _finish_stopped(self, request_id: str, keep: int) -> bool:
        """Finish a request a gateway found a stop string in: finished, reason "stop", its output
        cut to its first ``keep`` tokens (vLLM's result; later tokens are never delivered), in
        memory at once, in Redis behind the lane's pending writes, counted as a finish. ``keep``
        beyond the tokens delivered so far is INVALID_ARGUMENT: a gateway never saw more."""
        lane = self.workers.lane_of(request_id)
        request = lane.core.requests[request_id] if lane is not None else next(
            (r for r in self.workers.orphans if r.request_id == request_id), None)
        channel = self.delivery.channels.get(request_id)
        if request is None or channel is None:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"request {request_id!r} is not running or waiting")
        if keep > len(channel.tokens):
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"keep_output_tokens = {keep} is beyond the "
                               f"{len(channel.tokens)} tokens request {request_id!r} has delivered")
        now = time.time()
        if lane is not None:
            try:
                lane.core.finish_stopped(request_id, keep, now)
            except ValueError as exc:  # nothing changed
                raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            lane.core.forget(request_id)
            lane.wakeup.set()
        else:  # waiting for a worker: nothing runs it
            self.workers.take_orphan(request_id)
            request.drop_pending_outputs()
            del request.output_token_ids[keep:]
            request.status, request.finish_reason, request.finish_s = RequestStatus.FINISHED, FinishReason.STOP, now
        cut = truncation(keep, channel.logprobs)
        self.delivery.close(request_id, FinishReason.STOP.value, keep=keep)
        self.metrics.stopped_request(request, keep, now)
        log.info("request_stopped", request=request_id, kept=keep)
        changes = IterationChanges(worker_id=lane.worker_id if lane is not None else "",
                                   status={request_id: (RequestStatus.FINISHED, FinishReason.STOP.value)},
                                   finished=[request_id], truncate={request_id: cut})
        await self._record(lane, changes, request_id)
        return True

    async def _record(self, lane: WorkerLane | None, changes: IterationChanges, request_id: str) -> None:
        """Write an ended request's record (``changes``): everything in memory is done before
        the first await, so a caller that gives up cannot leave it half-done."""
        # Behind the lane's own pending writes: one of them may still carry this request's
        # tokens or a "running" status, and Redis must end with the end written here.
        if lane is not None:
            write = self.background.track(lane.commits.record(changes))
        else:
            write = self.background.spawn(self.committer.write_durably(changes))
        await asyncio.wait({write}, timeout=1.0)
        if not write.done():
            log.warning("cancel_write_deferred", request=request_id)
