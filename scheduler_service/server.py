"""The Scheduler gRPC servicer: thin, over ``SchedulerApp``'s parts. A failed call aborts with the
status ``errors.status_of`` gives its exception."""

from __future__ import annotations

from typing import Any, AsyncIterator, Callable, TypeVar

import grpc
import structlog

from accelgen.common.authz import peer_roles
from accelgen.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from accelgen.wire.slo import slo_to_proto
from scheduler_service import convert
from scheduler_service.app import SchedulerApp
from scheduler_service.errors import ServiceError, status_of
from scheduler_service.state.store import status_text
from scheduler_service.worker_identity import certificate_identity

log = structlog.get_logger("scheduler.rpc")

T = TypeVar("T")

RETRY_AFTER_KEY = "retry-after-ms"
"""Trailing metadata of a refusal that a retry may overcome: when to retry, in milliseconds."""


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    code, message, retry_after_s = status_of(exc)
    if retry_after_s is not None:
        context.set_trailing_metadata(((RETRY_AFTER_KEY, str(max(0, round(retry_after_s * 1000)))),))
    await context.abort(code, bounded(message))


def bounded(message: str) -> str:
    """A status message short enough for gRPC's metadata limit (8 KiB by default): messages quote
    what the client sent, and an over-long quote would turn the answer into RESOURCE_EXHAUSTED."""
    return message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS] + "... (cut)"


MAX_MESSAGE_CHARS = 2000


def _checked(check: Callable[..., T], *args: Any) -> T:
    """Run one of ``convert``'s checks (its result); a bad field becomes INVALID_ARGUMENT naming it."""
    try:
        return check(*args)
    except convert.InvalidInput as exc:
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, app: SchedulerApp) -> None:
        self.app = app

    def _identity(self, context: grpc.aio.ServicerContext) -> str:
        """The calling worker's certificate (``worker_identity``): a worker id is bound to it."""
        return certificate_identity(context, tls=bool(self.app.config.tls_dir))

    async def Submit(self, request, context):
        structlog.contextvars.bind_contextvars(request_id=request.request_id[:convert.MAX_REQUEST_ID_CHARS])
        try:
            r = await self.app.intake.submit(request)
        except Exception as exc:
            await _abort(context, exc)
        log.info("submitted", prompt_tokens=r.num_prompt_tokens, app_class=r.app_class,
                 worker=self.app.workers.worker_of(r.request_id), label=request.label, tenant=request.tenant)
        return scheduler_pb2.SubmitResponse(request_id=r.request_id, slo=slo_to_proto(r.slo))

    async def WatchMany(self, request_iterator, context) -> AsyncIterator[scheduler_pb2.WatchManyResponse]:
        try:
            async for resp in self.app.delivery.watch_many(request_iterator):
                yield resp
        except Exception as exc:
            await _abort(context, exc)

    async def Cancel(self, request, context):
        try:
            _checked(convert.check_request_id, request.request_id)
            keep = request.keep_output_tokens if request.HasField("keep_output_tokens") else None
            ok = await self.app.intake.cancel(request.request_id, request.finish_reason, keep)
        except Exception as exc:
            await _abort(context, exc)
        return common_pb2.CancelResponse(cancelled=ok)

    async def GetRequest(self, request, context):
        try:
            _checked(convert.check_request_id, request.request_id)
            rec = await self.app.store.load_request(request.request_id)
        except Exception as exc:
            await _abort(context, exc)
        if rec is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, bounded(f"request {request.request_id!r} is unknown (or expired)"))
        r = rec.request
        return common_pb2.RequestState(
            request_id=r.request_id, status=status_text(r.status), output_ids=r.output_token_ids,
            finish_reason=r.finish_reason.value if r.finish_reason else "", app_class=r.app_class,
            slo=slo_to_proto(r.slo), prompt_tokens=r.num_prompt_tokens, num_preemptions=r.num_preemptions,
            prompt_token_ids=r.prompt_token_ids if request.include_prompt else (), arrival_s=r.arrival_s,
            tenant=rec.tenant, label=rec.label, stop=rec.stop,
            include_stop_str_in_output=rec.include_stop_str_in_output)

    async def GetServerInfo(self, request, context):
        return self.app.server_info()

    async def RegisterWorker(self, request, context):
        try:
            worker_id, address, info = _checked(convert.worker_from_register, request)  # before anything is built
            await self.app.workers.register(worker_id, address, info, self._identity(context))
        except Exception as exc:
            await _abort(context, exc)
        cfg = self.app.config
        return scheduler_pb2.RegisterWorkerResponse(heartbeat_interval_s=cfg.heartbeat_interval_s,
                                                    heartbeat_ttl_s=cfg.heartbeat_ttl_s)

    async def Heartbeat(self, request, context):
        try:
            _checked(convert.check_worker_id, request.worker_id)
            known = await self.app.workers.heartbeat(request.worker_id, self._identity(context))
        except Exception as exc:
            await _abort(context, exc)
        drain = self.app.workers.drain_state(request.worker_id)
        return scheduler_pb2.HeartbeatResponse(known=known, draining=drain.draining, assigned=drain.assigned,
                                               drain_left_s=drain.left_s)

    async def DeregisterWorker(self, request, context):
        try:
            _checked(convert.check_worker_id, request.worker_id)
            await self.app.workers.deregister(request.worker_id, self._identity(context))
        except Exception as exc:
            await _abort(context, exc)
        return scheduler_pb2.DeregisterWorkerResponse()

    async def DrainWorker(self, request, context):
        try:
            _checked(convert.check_worker_id, request.worker_id)
            workers = self.app.workers
            if request.query:  # report only: `accelgen drain --wait` polls this
                if request.worker_id not in workers.lanes:
                    raise ServiceError(grpc.StatusCode.NOT_FOUND, f"worker {request.worker_id!r} is not registered")
                drain = workers.drain_state(request.worker_id)
            else:
                # With mutual TLS the gateway role is the operator's (`accelgen drain`): any worker;
                # a worker's certificate drains only the worker it holds. Plaintext: loopback only.
                operator = bool(self.app.config.tls_dir) and "gateway" in peer_roles(context)
                drain = await workers.drain(request.worker_id, request.grace_s, self._identity(context), operator)
        except Exception as exc:
            await _abort(context, exc)
        return scheduler_pb2.DrainWorkerResponse(assigned=drain.assigned, drain_left_s=drain.left_s,
                                                 draining=drain.draining)
