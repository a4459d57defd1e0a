"""One WatchMany stream to the scheduler for every request this gateway streams.

With a stream per request, every iteration cost one gRPC message per running request on both
sides; at saturation that message traffic was most of the scheduler's and the gateway's CPU
(docs/vllm_comparison.md). The hub multiplexes: requests subscribe with the index they want to
start from, the scheduler sends each round of new tokens for all of them as one message, and
the hub hands each request its batches through its own queue.

The hub does not resume anything itself. When the stream breaks (scheduler restart, network),
every subscriber gets the error, and ``SchedulerClient.watch`` resumes each request from the
tokens it already has; the first resubscription opens a new stream. A stream that stays open but
goes silent while the scheduler shows progress is broken on purpose (``restart``), with the same
effect: every request re-subscribes from its delivered index.

Every message names the gateway (``owner``): the scheduler cancels the requests of a gateway
whose streams have all been gone for its ``owner_gone_cancel_s``.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncGenerator, AsyncIterator, Callable

import grpc
import structlog

from accelgen.v1 import scheduler_pb2, scheduler_pb2_grpc
from accelgen.wire.watch import watch_messages
from gateway.errors import GatewayError

log = structlog.get_logger("gateway.watch_hub")

Item = scheduler_pb2.TokenBatch | grpc.aio.AioRpcError | GatewayError

IDLE = None
"""What ``watch`` yields when nothing came for ``idle_s``: the caller checks the request."""


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """An error shaped like a failed call, so one request's failure on the shared stream is
    handled (resumed, or passed to the client) exactly like the stream's own failure."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class WatchHub:
    def __init__(self, stub_of: Callable[[], scheduler_pb2_grpc.SchedulerStub], owner: str = "") -> None:
        self._stub_of = stub_of  # the current stub: the channel is replaced when its address stops answering
        self._owner = owner
        self._subs: dict[str, asyncio.Queue[Item]] = {}
        self._outbox: asyncio.Queue[scheduler_pb2.WatchManyRequest] | None = None
        self._call: grpc.aio.StreamStreamCall | None = None
        self._reader: asyncio.Task[None] | None = None
        self._closed = False
        self._restart_reason = ""
        self._last_message_at = time.monotonic()

    def can_watch(self, request_id: str) -> bool:
        """False when the hub already streams this request (one index per request and stream)."""
        return request_id not in self._subs

    async def watch(self, request_id: str, start_index: int, idle_s: float | None = None
                    ) -> AsyncGenerator[scheduler_pb2.TokenBatch | None, None]:
        """Batches of ``request_id`` from ``start_index`` on until it finishes; raises the
        request's error (or the stream's) as ``grpc.aio.AioRpcError``. With ``idle_s``, yields
        ``IDLE`` (None) after every ``idle_s`` without news, the subscription staying in place."""
        queue: asyncio.Queue[Item] = asyncio.Queue()
        self._subs[request_id] = queue
        finished = False
        try:
            self._send(scheduler_pb2.WatchManyRequest(
                watch=[scheduler_pb2.WatchRequest(request_id=request_id, start_index=start_index)]))
            while True:
                if idle_s is None:
                    item = await queue.get()
                else:
                    try:
                        item = await asyncio.wait_for(queue.get(), idle_s)
                    except TimeoutError:
                        yield IDLE
                        continue
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if self._subs.get(request_id) is queue:
                del self._subs[request_id]
                if not finished and self._outbox is not None and not self._closed:  # the client left
                    self._send(scheduler_pb2.WatchManyRequest(unwatch=[request_id]))

    def silent_for(self) -> float:
        """Seconds since the shared stream last delivered anything (or was opened)."""
        return time.monotonic() - self._last_message_at

    def restart(self, reason: str) -> bool:
        """Break the shared stream on purpose (it went silent although the scheduler shows
        progress): every subscriber gets UNAVAILABLE and re-subscribes from its delivered index
        on a new stream."""
        call = self._call
        if call is not None and not self._closed:
            log.warning("watch_many_restart", reason=reason, requests=len(self._subs))
            self._restart_reason = reason
            call.cancel()
            return True
        return False

    def close(self) -> None:
        """The gateway is shutting down: end every stream here, and open no new one (the
        requests keep running at the scheduler)."""
        self._closed = True
        if self._call is not None:
            self._call.cancel()

    # -- the shared stream -------------------------------------------------------------------
    def _send(self, msg: scheduler_pb2.WatchManyRequest) -> None:
        if self._closed:
            raise _shutting_down()
        if self._outbox is None:
            self._open()
        assert self._outbox is not None
        self._outbox.put_nowait(msg)

    def _open(self) -> None:
        outbox: asyncio.Queue[scheduler_pb2.WatchManyRequest] = asyncio.Queue()
        call = self._stub_of().WatchMany(_requests(outbox, self._owner))  # first: it raises on a closed channel
        self._outbox, self._call = outbox, call
        self._last_message_at = time.monotonic()
        self._reader = asyncio.get_running_loop().create_task(self._read(call, outbox))

    async def _read(self, call: grpc.aio.StreamStreamCall, outbox: asyncio.Queue) -> None:
        code, details = grpc.StatusCode.UNAVAILABLE, "the WatchMany stream ended"
        try:
            async for resp in call:
                self._last_message_at = time.monotonic()
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
            # Whatever ended the shared stream, each request is resumed (a request's own failure
            # comes as a WatchError): one bad stream must not fail every request on the gateway.
            details = f"the WatchMany stream broke: {exc.code().name}: {exc.details()}"
        except asyncio.CancelledError:
            details = (f"the gateway re-opens the WatchMany stream: {self._restart_reason}" if self._restart_reason
                       else "the gateway closed the WatchMany stream")
            self._restart_reason = ""
        except Exception:  # noqa: BLE001 - a bug here must reach the log and the waiting requests
            log.exception("watch_many_reader_failed")
            details = "the gateway's WatchMany reader failed"
        finally:
            if self._outbox is outbox:  # the next subscription opens a new stream
                self._outbox, self._call, self._reader = None, None, None
            for queue in self._subs.values():  # one error each: a shared one grows every traceback
                queue.put_nowait(_shutting_down() if self._closed else rpc_error(code, details))
            self._subs.clear()


async def _requests(outbox: asyncio.Queue[scheduler_pb2.WatchManyRequest], owner: str = ""
                    ) -> AsyncIterator[scheduler_pb2.WatchManyRequest]:
    """The request side of the stream: whatever queued up since the last write, as one message
    (several past ``WATCH_IDS_PER_GATEWAY_MESSAGE`` ids).

    Only the last operation on each request survives the merge (the scheduler applies a
    message's unwatches before its watches, so "watch r, unwatch r" must not become both)."""
    while True:
        last: dict[str, scheduler_pb2.WatchRequest | None] = {}  # request id -> watch, None = unwatch
        while True:
            msg = await outbox.get() if not last else outbox.get_nowait()
            for w in msg.watch:
                last.pop(w.request_id, None)
                last[w.request_id] = w
            for rid in msg.unwatch:
                last.pop(rid, None)
                last[rid] = None
            if outbox.empty():
                break
        # In messages a scheduler takes (a re-watch of thousands after a restart is split).
        for msg in watch_messages([w for w in last.values() if w is not None],
                                  [rid for rid, w in last.items() if w is None], owner):
            yield msg


def _shutting_down() -> GatewayError:
    return GatewayError(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down; the request keeps running "
                                                     "at the scheduler (GetRequest returns its output)")


def _status(number: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN
