"""One WatchMany stream to the scheduler for every request this gateway streams.

With a Watch stream per request, every iteration cost one gRPC message per running request on
both sides; at saturation that message traffic was most of the scheduler's and the gateway's
CPU (docs/vllm_comparison.md). The hub multiplexes: requests subscribe with the index they want
to start from, the scheduler sends each round of new tokens for all of them as one message, and
the hub hands each request its batches through its own queue.

The hub does not resume anything itself. When the stream breaks (scheduler restart, network),
every subscriber gets the error, and ``SchedulerClient.watch`` resumes each request from the
tokens it already has, exactly as it does for a broken Watch; the first resubscription opens a
new stream. A scheduler without WatchMany (UNIMPLEMENTED) switches the hub off, and requests go
back to one Watch each.
"""

from __future__ import annotations

import asyncio
from typing import AsyncGenerator, AsyncIterator

import grpc
import structlog

from accelgen.v1 import scheduler_pb2, scheduler_pb2_grpc

log = structlog.get_logger("gateway.watch_hub")

Item = scheduler_pb2.TokenBatch | grpc.aio.AioRpcError


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """An error shaped like a failed call, so one request's failure on the shared stream is
    handled (resumed, or passed to the client) exactly like a failed Watch of its own."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class WatchHub:
    def __init__(self, stub: scheduler_pb2_grpc.SchedulerStub) -> None:
        self._stub = stub
        self._subs: dict[str, asyncio.Queue[Item]] = {}
        self._outbox: asyncio.Queue[scheduler_pb2.WatchManyRequest] | None = None
        self._call: grpc.aio.StreamStreamCall | None = None
        self._reader: asyncio.Task[None] | None = None
        self.enabled = True

    def can_watch(self, request_id: str) -> bool:
        """False when the hub is off, or already streams this request (one index per request)."""
        return self.enabled and request_id not in self._subs

    async def watch(self, request_id: str, start_index: int) -> AsyncGenerator[scheduler_pb2.TokenBatch, None]:
        """Batches of ``request_id`` from ``start_index`` on until it finishes; raises the
        request's error (or the stream's) as ``grpc.aio.AioRpcError``."""
        queue: asyncio.Queue[Item] = asyncio.Queue()
        self._subs[request_id] = queue
        finished = False
        try:
            self._send(scheduler_pb2.WatchManyRequest(
                watch=[scheduler_pb2.WatchRequest(request_id=request_id, start_index=start_index)]))
            while True:
                item = await queue.get()
                if isinstance(item, grpc.aio.AioRpcError):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if self._subs.get(request_id) is queue:
                del self._subs[request_id]
                if not finished and self._outbox is not None:  # the client left: stop its tokens
                    self._send(scheduler_pb2.WatchManyRequest(unwatch=[request_id]))

    def close(self) -> None:
        if self._call is not None:
            self._call.cancel()

    # -- the shared stream -------------------------------------------------------------------
    def _send(self, msg: scheduler_pb2.WatchManyRequest) -> None:
        if self._outbox is None:
            self._open()
        assert self._outbox is not None
        self._outbox.put_nowait(msg)

    def _open(self) -> None:
        outbox: asyncio.Queue[scheduler_pb2.WatchManyRequest] = asyncio.Queue()
        self._outbox = outbox
        self._call = self._stub.WatchMany(_requests(outbox))
        self._reader = asyncio.get_running_loop().create_task(self._read(self._call, outbox))

    async def _read(self, call: grpc.aio.StreamStreamCall, outbox: asyncio.Queue) -> None:
        error = rpc_error(grpc.StatusCode.UNAVAILABLE, "the WatchMany stream ended")
        try:
            async for resp in call:
                subs = self._subs
                for batch in resp.batches:
                    queue = subs.get(batch.request_id)
                    if queue is not None:
                        queue.put_nowait(batch)
                for err in resp.errors:
                    queue = subs.get(err.request_id)
                    if queue is not None:
                        queue.put_nowait(rpc_error(_status(err.code), err.message))
        except grpc.aio.AioRpcError as exc:
            error = exc
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                self.enabled = False
                log.info("watch_many_unsupported", detail="the scheduler has no WatchMany; one Watch per request")
                error = rpc_error(grpc.StatusCode.UNAVAILABLE, "the scheduler has no WatchMany; watching again")
        except asyncio.CancelledError:
            error = rpc_error(grpc.StatusCode.CANCELLED, "the gateway closed the WatchMany stream")
        finally:
            if self._outbox is outbox:  # the next subscription opens a new stream
                self._outbox, self._call, self._reader = None, None, None
            for queue in self._subs.values():
                queue.put_nowait(error)
            self._subs.clear()


async def _requests(outbox: asyncio.Queue[scheduler_pb2.WatchManyRequest]
                    ) -> AsyncIterator[scheduler_pb2.WatchManyRequest]:
    """The request side of the stream: whatever queued up since the last write, as one message."""
    while True:
        msg = await outbox.get()
        while not outbox.empty():
            more = outbox.get_nowait()
            msg.watch.extend(more.watch)
            msg.unwatch.extend(more.unwatch)
        yield msg


def _status(number: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN
