"""WatchMany: the tokens of many requests over one stream, in one message per round of changes.

A gateway watches every request it serves. With one Watch stream per request the scheduler sent
one gRPC message per running request per iteration, and at a few hundred running requests the
gRPC work of those messages was most of the scheduler's CPU (docs/vllm_comparison.md). A
``WatchSession`` is one stream per gateway: a request's channel marks the sessions watching it
when it gets tokens, and the session sends everything new, for every marked request, as one
message. Under load that is about one message per committed iteration, whatever the batch size.

Same contract as Watch: tokens from ``start_index`` on, each once, in order; a request that
cannot be watched (unknown, or being recovered after a restart) gets a ``WatchError`` with the
status code Watch would have ended with, and the other requests go on.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, AsyncIterator

import grpc

from accelgen.v1 import scheduler_pb2
from scheduler_service.errors import ServiceError

if TYPE_CHECKING:
    from scheduler_service.app import RequestChannel, SchedulerApp


class WatchSession:
    """The requests one WatchMany stream watches, and which of them have news."""

    def __init__(self, app: "SchedulerApp") -> None:
        self.app = app
        self.next_index: dict[str, int] = {}
        self._dirty: set[str] = set()
        self._ready: list[scheduler_pb2.TokenBatch] = []  # whole answers from the store
        self._errors: list[scheduler_pb2.WatchError] = []
        self._event = asyncio.Event()
        self._lookups: set[asyncio.Task[None]] = set()

    # -- called by channels and by the request reader ---------------------------------------
    def mark(self, request_id: str) -> None:
        self._dirty.add(request_id)
        self._event.set()

    def watch(self, request_id: str, start_index: int) -> None:
        ch = self.app.channels.get(request_id)
        if ch is None:  # finished and expired here, unknown, or not yet recovered: ask the store
            # In a task of its own: a slow or absent Redis must not hold up the other requests.
            task = asyncio.get_running_loop().create_task(self._from_store(request_id, start_index))
            self._lookups.add(task)
            return
        self.next_index[request_id] = start_index
        ch.watchers.add(self)
        self.mark(request_id)

    async def _from_store(self, request_id: str, start_index: int) -> None:
        try:
            self._ready.append(await self.app.batch_from_store(request_id, start_index))
        except Exception as exc:  # noqa: BLE001 - every failure becomes this request's WatchError
            self._fail(request_id, exc)
        finally:
            self._lookups.discard(asyncio.current_task())  # before waking serve(), which counts them
            self._event.set()

    def unwatch(self, request_id: str) -> None:
        self.next_index.pop(request_id, None)
        ch = self.app.channels.get(request_id)
        if ch is not None:
            ch.watchers.discard(self)

    def close(self) -> None:
        for task in self._lookups:
            task.cancel()
        for rid in list(self.next_index):
            self.unwatch(rid)

    def _fail(self, request_id: str, exc: Exception) -> None:
        if isinstance(exc, ServiceError):
            code, text = getattr(grpc.StatusCode, exc.code), str(exc)
        else:  # the store is what failed
            code, text = grpc.StatusCode.UNAVAILABLE, f"the state store (Redis) is unavailable: {exc}"
        self._errors.append(scheduler_pb2.WatchError(request_id=request_id, code=code.value[0], message=text))

    # -- the stream ---------------------------------------------------------------------------
    def take(self) -> scheduler_pb2.WatchManyResponse | None:
        """Everything new since the last call, as one message (None if nothing is)."""
        self._event.clear()
        resp = scheduler_pb2.WatchManyResponse()
        channels = self.app.channels
        for rid in self._dirty:
            idx = self.next_index.get(rid)
            if idx is None:
                continue
            ch: RequestChannel | None = channels.get(rid)
            if ch is None:  # cannot happen while watched (a finished channel is kept a minute)
                self.unwatch(rid)
                self._errors.append(scheduler_pb2.WatchError(
                    request_id=rid, code=grpc.StatusCode.UNAVAILABLE.value[0], message="watch again"))
                continue
            end, finished = len(ch.tokens), ch.finished
            if idx < end or finished:
                resp.batches.append(scheduler_pb2.TokenBatch(
                    request_id=rid, token_ids=ch.tokens[idx:end], start_index=idx, emitted_at=ch.times[idx:end],
                    finished=finished, finish_reason=ch.finish_reason if finished else "",
                    prompt_tokens=ch.prompt_tokens))
                self.next_index[rid] = end
                if finished:
                    self.unwatch(rid)
        self._dirty.clear()
        if self._ready:
            resp.batches.extend(self._ready)
            self._ready.clear()
        if self._errors:
            resp.errors.extend(self._errors)
            self._errors.clear()
        return resp if resp.batches or resp.errors else None

    async def serve(self, requests: AsyncIterator[scheduler_pb2.WatchManyRequest]
                    ) -> AsyncIterator[scheduler_pb2.WatchManyResponse]:
        """Read watch/unwatch requests in the background and yield news as it comes; ends when
        the client has stopped sending and nothing it watches is left unfinished."""
        reader = asyncio.create_task(self._read(requests))
        try:
            while True:
                await self._event.wait()
                resp = self.take()
                if resp is not None:
                    yield resp
                if reader.done():
                    reader.result()  # re-raise what broke the request stream
                    if not (self.next_index or self._lookups or self._ready or self._errors):
                        return
        finally:
            reader.cancel()
            self.close()

    async def _read(self, requests: AsyncIterator[scheduler_pb2.WatchManyRequest]) -> None:
        try:
            async for msg in requests:
                for rid in msg.unwatch:
                    self.unwatch(rid)
                for w in msg.watch:
                    self.watch(w.request_id, w.start_index)
        finally:
            self._event.set()  # serve() notices the client is done
