"""Delivery: committed tokens to the gateways. Owns the request channels and the WatchMany streams.

Each request has a ``RequestChannel``: its tokens so far and whether it is done. The committer
hands every iteration to ``Delivery.publish`` once it is durable in Redis, so a channel never
holds a token a restarted scheduler would not know.

A gateway watches every request it serves over one WatchMany stream (a ``WatchSession``). With a
stream per request the scheduler sent one gRPC message per running request per iteration, and at
a few hundred running requests the gRPC work of those messages was most of the scheduler's CPU
(docs/vllm_comparison.md). A request's channel marks the sessions watching it when it gets
tokens, and the session sends everything new, for every marked request, as one message: under
load about one message per committed iteration, whatever the batch size.

The contract: tokens from ``start_index`` on, each once, in order; a request that cannot be
watched (unknown, or being recovered after a restart) gets a ``WatchError`` with the status
``errors.status_of`` gives its failure, and the other requests go on.

A stream names its gateway (``owner``); ``owners.OwnerBook`` counts each owner's open streams and
cancels the requests of an owner gone ``owner_gone_cancel_s`` (started with ``start_owner_sweep``).

**Bounds** (``WatchLimits``, from the ``watch_*`` settings). A message with more ids than
``ids_per_message`` (or a malformed id or owner) ends the stream with INVALID_ARGUMENT; a request
beyond ``ids_per_stream`` watched at once gets a RESOURCE_EXHAUSTED WatchError. A request with no
channel here is looked up in Redis, which shares its connection pool with the iteration commits:
at most ``store_lookups`` such lookups run at once, all streams together, and each stream queues
the rest (a tuple each, not a task), so a stream watching 10^5 unknown ids cannot starve commits.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterable

import grpc

from accelgen.core.logprobs import TokenLogprob
from accelgen.v1 import scheduler_pb2
from accelgen.wire.logprobs import logprob_to_proto
from scheduler_service import convert
from scheduler_service.errors import ServiceError, status_of
from scheduler_service.owners import CancelFn, OwnerBook
from scheduler_service.state.store import IterationChanges, RedisStore

CHANNEL_KEPT_S = 60.0
"""How long a finished request's channel stays for late watchers (Redis keeps the record longer)."""


def token_batch(request_id: str, prompt_tokens: int, tokens: list[int], times: list[float], start: int, end: int,
                finish_reason: str | None, logprobs: list[TokenLogprob] | None = None) -> scheduler_pb2.TokenBatch:
    """The one place a ``TokenBatch`` is built: tokens ``start:end`` of a request's output (with
    their emission times, and their logprobs when it asked: ``logprobs`` aligned with ``tokens``);
    ``finish_reason`` None while the request runs."""
    batch = scheduler_pb2.TokenBatch(request_id=request_id, token_ids=tokens[start:end], start_index=start,
                                     emitted_at=times[start:end], finished=finish_reason is not None,
                                     finish_reason=finish_reason or "", prompt_tokens=prompt_tokens)
    if logprobs and len(logprobs) >= end:  # never a list that does not line up with token_ids
        batch.logprobs.extend(logprob_to_proto(lp) for lp in logprobs[start:end])
    return batch


@dataclass(eq=False)
class RequestChannel:
    """What watchers of one request see: its tokens so far and whether it is done."""

    request_id: str
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token; empty: not asked
    finished: bool = False
    finish_reason: str = ""
    watchers: set[WatchSession] = field(default_factory=set)  # WatchMany streams watching it

    def notify(self) -> None:
        for session in self.watchers:
            session.mark(self.request_id)

    def batch(self, start: int) -> tuple[scheduler_pb2.TokenBatch | None, int]:
        """Everything from ``start`` on (None if nothing is new), and the index after it."""
        end, finished = len(self.tokens), self.finished  # one consistent snapshot per batch
        if start >= end and not finished:
            return None, start
        return token_batch(self.request_id, self.prompt_tokens, self.tokens, self.times, start, end,
                           self.finish_reason if finished else None, self.logprobs), end


@dataclass(frozen=True)
class WatchLimits:
    """What WatchMany streams may ask of this scheduler (the ``watch_*`` settings)."""

    ids_per_message: int = 1024  # watch + unwatch ids in one WatchManyRequest
    ids_per_stream: int = 100_000  # requests one stream watches at once
    store_lookups: int = 8  # Redis lookups at once, all streams together


class Delivery:
    """The request channels, and the WatchMany streams reading them."""

    def __init__(self, store: RedisStore, limits: WatchLimits = WatchLimits()) -> None:
        self.store = store
        self.limits = limits
        self.lookup_slots = asyncio.Semaphore(limits.store_lookups)  # shared by every stream
        self.channels: dict[str, RequestChannel] = {}
        self.owners = OwnerBook(store, self.channels)
        self.sent_lag_s: deque[float] = deque(maxlen=5000)  # a token applied -> sent to its gateway

    def start_owner_sweep(self, cancel: CancelFn, owner_gone_cancel_s: float) -> None:
        """After recovery: cancel (with ``cancel``, the intake's) the requests of gateways gone
        ``owner_gone_cancel_s`` (0 = never)."""
        self.owners.start(cancel, owner_gone_cancel_s)

    async def stop(self) -> None:
        await self.owners.stop()

    def open(self, request_id: str, prompt_tokens: int, tokens: Iterable[int] = (),
             times: Iterable[float] = (), logprobs: Iterable[TokenLogprob] = ()) -> None:
        """A channel for an accepted (or recovered, with its outputs so far) request."""
        self.channels[request_id] = RequestChannel(request_id=request_id, prompt_tokens=prompt_tokens,
                                                   tokens=list(tokens), times=list(times), logprobs=list(logprobs))

    def publish(self, changes: IterationChanges) -> None:
        """One committed iteration: its tokens into their channels, its finished requests closed."""
        touched = set()
        for rid, (tokens, times) in changes.tokens.items():
            ch = self.channels.get(rid)
            if ch is not None and not ch.finished:  # a cancelled request's channel takes no more
                ch.tokens.extend(tokens)
                ch.times.extend(times)
                ch.logprobs.extend(changes.logprobs.get(rid, ()))
                touched.add(rid)
        for rid in changes.finished:
            self.close(rid, changes.status[rid][1])
            touched.discard(rid)
        for rid in touched:
            self.channels[rid].notify()

    def history(self, request_id: str) -> tuple[list[int], list[float], list[TokenLogprob]] | None:
        """The tokens (and emission times, logprobs) a request's clients have been delivered: what
        Redis holds for it (the committer restores it from here if Redis lost some). None: unknown."""
        ch = self.channels.get(request_id)
        return None if ch is None else (list(ch.tokens), list(ch.times), list(ch.logprobs))

    def close(self, request_id: str, reason: str, keep: int | None = None) -> None:
        """The request is done: its watchers get the end, and the channel goes a while later.
        ``keep``: only its first ``keep`` tokens stand (a gateway's stop string ended it); no
        watcher is sent one after them from here on."""
        ch = self.channels.get(request_id)
        if ch is None:
            return
        if keep is not None:
            del ch.tokens[keep:], ch.times[keep:], ch.logprobs[keep:]
        ch.finished = True
        ch.finish_reason = reason
        ch.notify()
        self.owners.finished(request_id)
        asyncio.get_running_loop().call_later(CHANNEL_KEPT_S, self.channels.pop, request_id, None)

    async def batch_from_store(self, request_id: str, start_index: int) -> scheduler_pb2.TokenBatch:
        """A request with no live channel here: its whole output from Redis if it finished;
        otherwise UNAVAILABLE (it is being recovered after a restart: watch again)."""
        rec = await self.store.load_request(request_id)
        if rec is None:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"request {request_id!r} is unknown (or expired)")
        r = rec.request
        if not r.status.is_done:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"request {request_id!r} is being recovered; watch again")
        out = r.output_token_ids
        return token_batch(request_id, r.num_prompt_tokens, out, rec.emitted_at, start_index, len(out),
                           r.finish_reason.value if r.finish_reason else "", rec.logprobs)

    def watch_many(self, requests: AsyncIterator[scheduler_pb2.WatchManyRequest]
                   ) -> AsyncIterator[scheduler_pb2.WatchManyResponse]:
        """One WatchMany stream."""
        return WatchSession(self).serve(requests)


class WatchSession:
    """The requests one WatchMany stream watches, and which of them have news."""

    def __init__(self, delivery: Delivery) -> None:
        self.delivery = delivery
        self.owner = ""  # the gateway whose stream this is (the first owner a message names)
        self.next_index: dict[str, int] = {}
        self._dirty: set[str] = set()
        self._ready: list[scheduler_pb2.TokenBatch] = []  # whole answers from the store
        self._errors: list[scheduler_pb2.WatchError] = []
        self._event = asyncio.Event()
        self._pending: deque[tuple[str, int]] = deque()  # (request id, start) to look up in the store
        self._in_store = 0  # requests queued or being looked up there
        self._lookups: set[asyncio.Task[None]] = set()  # at most limits.store_lookups, draining _pending

    # -- called by channels and by the request reader ---------------------------------------
    def mark(self, request_id: str) -> None:
        self._dirty.add(request_id)
        self._event.set()

    def watch(self, request_id: str, start_index: int) -> None:
        limit = self.delivery.limits.ids_per_stream
        if request_id not in self.next_index and len(self.next_index) + self._in_store >= limit:
            self._fail(request_id, ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"this WatchMany stream already watches {limit} requests, the "
                "most watch_max_ids_per_stream allows; unwatch finished ones or open another stream"))
            self._event.set()
            return
        ch = self.delivery.channels.get(request_id)
        if ch is None:  # finished and expired here, unknown, or not yet recovered: ask the store
            # Off this reader: a slow or absent Redis must not hold up the other requests.
            self._pending.append((request_id, start_index))
            self._in_store += 1
            if len(self._lookups) < self.delivery.limits.store_lookups:
                self._lookups.add(asyncio.get_running_loop().create_task(self._drain()))
            return
        self.next_index[request_id] = start_index
        ch.watchers.add(self)
        if self.owner and not ch.finished:
            self.delivery.owners.watched_by(request_id, self.owner)
        self.mark(request_id)

    async def _drain(self) -> None:
        """Look the queued requests up in the store, one at a time, each in one of the delivery's
        ``lookup_slots``."""
        try:
            while self._pending:
                request_id, start_index = self._pending.popleft()
                try:
                    async with self.delivery.lookup_slots:
                        self._ready.append(await self.delivery.batch_from_store(request_id, start_index))
                except Exception as exc:  # noqa: BLE001 - every failure becomes this request's WatchError
                    self._fail(request_id, exc)
                finally:
                    self._in_store -= 1
                    self._event.set()
        finally:
            self._lookups.discard(asyncio.current_task())  # before waking serve(), which counts them
            self._event.set()

    def unwatch(self, request_id: str) -> None:
        self.next_index.pop(request_id, None)
        ch = self.delivery.channels.get(request_id)
        if ch is not None:
            ch.watchers.discard(self)

    def close(self) -> None:
        self._pending.clear()
        for task in self._lookups:
            task.cancel()
        for rid in list(self.next_index):
            self.unwatch(rid)
        if self.owner:
            self.delivery.owners.stream_closed(self.owner)
            self.owner = ""

    def _fail(self, request_id: str, exc: Exception) -> None:
        code, text, _ = status_of(exc)
        self._errors.append(scheduler_pb2.WatchError(request_id=request_id, code=code.value[0], message=text))

    # -- the stream ---------------------------------------------------------------------------
    def take(self) -> scheduler_pb2.WatchManyResponse | None:
        """Everything new since the last call, as one message (None if nothing is)."""
        self._event.clear()
        resp = scheduler_pb2.WatchManyResponse()
        channels = self.delivery.channels
        for rid in self._dirty:
            idx = self.next_index.get(rid)
            if idx is None:
                continue
            ch = channels.get(rid)
            if ch is None:  # cannot happen while watched (a finished channel is kept a minute)
                self.unwatch(rid)
                self._fail(rid, ServiceError(grpc.StatusCode.UNAVAILABLE, "watch again"))
                continue
            batch, end = ch.batch(idx)
            if batch is not None:
                resp.batches.append(batch)
                self.next_index[rid] = end
                if batch.finished:
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
                    now, lags = time.time(), self.delivery.sent_lag_s
                    for b in resp.batches:
                        if b.emitted_at:
                            lags.append(now - b.emitted_at[-1])
                    yield resp
                if reader.done():
                    reader.result()  # re-raise what broke the request stream
                    if not (self.next_index or self._in_store or self._lookups or self._ready or self._errors):
                        return
        finally:
            reader.cancel()
            self.close()

    async def _read(self, requests: AsyncIterator[scheduler_pb2.WatchManyRequest]) -> None:
        try:
            async for msg in requests:
                self._check(msg)  # the whole message, before any of it applies
                if msg.owner and not self.owner:
                    self.owner = msg.owner
                    self.delivery.owners.stream_opened(msg.owner)
                for rid in msg.unwatch:
                    self.unwatch(rid)
                for w in msg.watch:
                    self.watch(w.request_id, w.start_index)
        finally:
            self._event.set()  # serve() notices the client is done

    def _check(self, msg: scheduler_pb2.WatchManyRequest) -> None:
        """INVALID_ARGUMENT (the stream ends) for a message over ``ids_per_message`` ids or with a
        malformed id or owner: a client bug, or not a gateway."""
        most = self.delivery.limits.ids_per_message
        n = len(msg.watch) + len(msg.unwatch)
        try:
            if n > most:
                raise convert.InvalidInput(f"a WatchManyRequest may carry at most {most} request ids (watch and "
                                           f"unwatch together), got {n}; send them in several messages")
            convert.check_printable("owner", msg.owner, convert.MAX_OWNER_CHARS)
            for w in msg.watch:
                convert.check_request_id(w.request_id, "watch.request_id")
            for rid in msg.unwatch:
                convert.check_request_id(rid, "unwatch")
        except convert.InvalidInput as exc:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
