"""A request whose bytes are not a valid protobuf message is INVALID_ARGUMENT, not UNKNOWN.

gRPC Python decodes a request before the servicer runs; when decoding fails (a truncated or
corrupt message, a proto3 string that is not UTF-8) the aio server answers UNKNOWN ("Unexpected
DecodeError"), a code that reads as a server fault. ``DecodeGuard`` is a server interceptor that
swaps each method's deserializer for one that never raises: an undecodable request reaches a
wrapper that aborts the call with INVALID_ARGUMENT naming the message type and the parse error,
before the servicer sees anything. Found by ``bench/fuzz.py`` (``wire_bytes`` mutations).
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc


class _Undecodable:
    """Stands in for a request that could not be decoded."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def run(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except Exception as exc:  # DecodeError, or anything a custom deserializer raises
            return _Undecodable(exc)
    return run


async def _refuse(context: grpc.aio.ServicerContext, method: str, bad: _Undecodable) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"{method}: the request is not a valid protobuf message: {bad.error}")


class _StreamState:
    bad: _Undecodable | None = None


async def _checked(requests: AsyncIterator[Any], state: _StreamState) -> AsyncIterator[Any]:
    """The client's messages; at an undecodable one, the reader is cancelled (a servicer reading
    in a task of its own re-raises that, as it would a cancelled call) and the handler's wrapper
    aborts the call. Aborting right here, in the servicer's reader task, raced the servicer's own
    writes and reached its error handling as an unexpected exception (an "internal_error")."""
    async for request in requests:
        if isinstance(request, _Undecodable):
            state.bad = request
            raise asyncio.CancelledError
        yield request


class DecodeGuard(grpc.aio.ServerInterceptor):
    """See the module docstring; install with ``grpc.aio.server(interceptors=[DecodeGuard()])``."""

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        deserializer = _tolerant(handler.request_deserializer)
        if handler.unary_unary is not None and inspect.iscoroutinefunction(handler.unary_unary):
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, _Undecodable):
                    await _refuse(context, method, request)
                return await inner_uu(request, context)

            return handler._replace(request_deserializer=deserializer, unary_unary=unary_unary)
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if isinstance(request, _Undecodable):
                    await _refuse(context, method, request)
                async for response in inner_us(request, context):
                    yield response

            return handler._replace(request_deserializer=deserializer, unary_stream=unary_stream)
        if handler.stream_stream is not None and inspect.isasyncgenfunction(handler.stream_stream):
            inner_ss = handler.stream_stream

            async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
                                    ) -> AsyncIterator[Any]:
                state = _StreamState()
                try:
                    async for response in inner_ss(_checked(requests, state), context):
                        yield response
                except asyncio.CancelledError:
                    if state.bad is None:
                        raise
                if state.bad is not None:
                    await _refuse(context, method, state.bad)

            return handler._replace(request_deserializer=deserializer, stream_stream=stream_stream)
        if handler.stream_unary is not None and inspect.iscoroutinefunction(handler.stream_unary):
            inner_su = handler.stream_unary

            async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                state = _StreamState()
                try:
                    reply = await inner_su(_checked(requests, state), context)
                except asyncio.CancelledError:
                    if state.bad is None:
                        raise
                if state.bad is not None:
                    await _refuse(context, method, state.bad)
                return reply

            return handler._replace(request_deserializer=deserializer, stream_unary=stream_unary)
        return handler  # a handler shape we do not wrap keeps gRPC's own decoding
