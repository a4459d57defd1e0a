"""The Gateway gRPC service: a thin servicer over ``GenerationService``.

Everything that decides anything (validation, SLO resolution, resume, cancel-on-abandon) lives
in ``generation``; this file only turns deltas into ``GenerateResponse`` messages and failures
into status codes through ``errors.status_of``. Each call first names its caller from the
``authorization: Bearer KEY`` metadata (UNAUTHENTICATED without a valid key, where keys are
configured) and counts against its key's rate — Generate and Attach also take a place under its
concurrency cap; health and reflection are other services and stay open.

Generate sends the request id the gateway made as ``x-request-id`` initial metadata as soon as
the scheduler has accepted the request, before any token: a client whose stream breaks before
its first chunk still knows what to ``Attach`` to.
"""

from __future__ import annotations

import contextlib
from typing import AsyncIterator, NoReturn

import grpc
import structlog

from accelgen.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from gateway.auth import Caller
from gateway.errors import RETRY_AFTER_KEY, retry_after_ms, status_of
from gateway.choices import expand, start_choices
from gateway.generation import ActiveRequest, Delta, GenerationService
from gateway.logprobs import TokenLogprobInfo

log = structlog.get_logger("gateway.grpc")

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
REQUEST_ID_KEY = "x-request-id"  # Generate's initial metadata: the id the gateway made


def logprobs_to_proto(logprobs: list[TokenLogprobInfo]) -> list[common_pb2.TokenLogprob]:
    return [common_pb2.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, rank=lp.rank,
                                    top=[common_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])
            for lp in logprobs]


def chunk_of(active: ActiveRequest, delta: Delta, index: int = 0) -> gateway_pb2.GenerateResponse:
    chunk = gateway_pb2.GenerateStreamChunk(
        token_ids=delta.token_ids, text=delta.text, prompt_tokens=active.prompt_tokens,
        completion_tokens=delta.completion_tokens,
        timings=[common_pb2.TokenTiming(emitted_at=t) for t in delta.emitted_at], index=index,
        logprobs=logprobs_to_proto(delta.logprobs))
    return gateway_pb2.GenerateResponse(request_id=active.request_id, chunk=chunk)


def complete_of(active: ActiveRequest, index: int = 0) -> gateway_pb2.GenerateResponse:
    o = active.outcome()
    complete = gateway_pb2.GenerateComplete(
        output_ids=o.output_ids, text=o.text, finish_reason=o.finish_reason, prompt_tokens=o.prompt_tokens,
        completion_tokens=o.completion_tokens, ttft_ms=o.ttft_ms, mean_tbt_ms=o.mean_tbt_ms, slo_met=o.slo_met,
        index=index, logprobs=logprobs_to_proto(o.logprobs))
    if isinstance(o.stop_reason, str):
        complete.stop_string = o.stop_reason
    elif o.stop_reason is not None:
        complete.stop_token_id = o.stop_reason
    return gateway_pb2.GenerateResponse(request_id=active.request_id, complete=complete)


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> NoReturn:
    code, message = status_of(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("rpc_failed")
    retry_ms = retry_after_ms(exc)
    if retry_ms is not None:  # the scheduler's retry hint reaches the client unchanged
        context.set_trailing_metadata(((RETRY_AFTER_KEY, str(retry_ms)),))
    await context.abort(code, message)
    raise AssertionError("unreachable: ServicerContext.abort raises")


def authorization_of(context: grpc.aio.ServicerContext) -> str | None:
    """The call's ``authorization`` metadata (the first, if sent more than once)."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else None
    return None


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, service: GenerationService) -> None:
        self._service = service

    def _caller(self, context: grpc.aio.ServicerContext) -> Caller:
        return self._service.authenticate(authorization_of(context))

    async def Generate(self, request: gateway_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        try:
            caller = self._caller(context)
            with caller.admit().until_failure() as lease:
                prepared = await self._service.prepare(request, caller=caller)
                children = expand(prepared, request.n)
                lease.widen(len(children) - 1)  # each sample is a stream under the key's cap
                choices = await start_choices(self._service, children, lease)
            try:  # one x-request-id per sample, in index order
                await context.send_initial_metadata(tuple((REQUEST_ID_KEY, a.request_id) for a in choices.actives))
            except BaseException:  # the client left right after the Submit: nobody will read it
                choices.close()
                raise
            async with contextlib.aclosing(choices.deltas()) as deltas:
                async for index, delta in deltas:
                    active = choices.actives[index]
                    if request.stream and (delta.token_ids or delta.text):  # finish_reason: in complete
                        yield chunk_of(active, delta, index)
                    if request.stream and delta.finished:
                        yield complete_of(active, index)
            if not request.stream:  # one answer per sample, in index order
                for index, active in enumerate(choices.actives):
                    yield complete_of(active, index)
        except Exception as exc:  # every failure becomes a status, in one place
            await _abort(context, exc)

    async def Attach(self, request: gateway_pb2.AttachRequest,
                     context: grpc.aio.ServicerContext) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """Generate's stream of a request already submitted, from ``from_token_index`` on."""
        try:
            caller = self._caller(context)
            active = await self._service.attach(request.request_id, request.from_token_index,
                                                request.keep_running, caller=caller, lease=caller.admit())
            async with contextlib.aclosing(active.deltas()) as deltas:
                async for delta in deltas:
                    if delta.token_ids or delta.text:
                        yield chunk_of(active, delta)
            yield complete_of(active)
        except Exception as exc:
            await _abort(context, exc)

    async def Cancel(self, request: common_pb2.CancelRequest,
                     context: grpc.aio.ServicerContext) -> common_pb2.CancelResponse:
        try:
            caller = self._caller(context)
            caller.charge()  # every call counts against the key's rate, reads and cancels too
            return await self._service.cancel(caller, request.request_id)
        except Exception as exc:
            await _abort(context, exc)

    async def GetRequest(self, request: common_pb2.GetRequestRequest,
                         context: grpc.aio.ServicerContext) -> common_pb2.RequestState:
        try:
            caller = self._caller(context)
            caller.charge()
            return await self._service.get_request(caller, request.request_id)
        except Exception as exc:
            await _abort(context, exc)


def add_to_server(server: grpc.aio.Server, service: GenerationService) -> None:
    gateway_pb2_grpc.add_GatewayServicer_to_server(GatewayServicer(service), server)
