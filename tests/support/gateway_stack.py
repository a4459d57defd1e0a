"""Test doubles for the gateway: a scripted in-process Scheduler and a background event loop.

``FakeScheduler`` implements the scheduler API the gateway uses (Submit, WatchMany, Cancel,
GetRequest, GetServerInfo) over real gRPC, with knobs for the failures the gateway must
survive: a Submit error, a WatchMany stream that breaks after N tokens of a request (a
scheduler restart), a resume that resends tokens the gateway already has, a stream that goes
silent without closing (``hold_at``). It records every call so tests can assert what reached the
scheduler — and what did not.

``LoopThread`` runs an asyncio loop in a daemon thread so synchronous tests (no pytest-asyncio)
can host aio servers and call them with ordinary blocking clients.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, AsyncGenerator, Awaitable, Callable, TypeVar

import grpc

from accelgen.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

T = TypeVar("T")


class LoopThread:
    """An event loop in a daemon thread; ``run`` executes a coroutine there and waits for it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Awaitable[T], timeout: float = 30.0) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        return fut.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


class _Refused(Exception):
    """How a scripted watch ends with a status (NOT_FOUND, or UNAVAILABLE for a break)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _Record:
    submit: scheduler_pb2.SubmitRequest
    tokens: list[int]
    broken: bool = False
    cancelled: bool = False
    held: bool = False
    sent: int = 0                        # tokens the fake has sent of it so far (its "progress")


def scripted_logprobs(token_ids: Any, k: int) -> list[common_pb2.TokenLogprob]:
    """Known logprobs for fakes that answer ``logprobs = k``: token t has -0.25 at rank 2, and
    its top k are t+1 (-0.125), t (-0.25), t+2 (-1.0), in that order."""
    top = [(1, -0.125), (0, -0.25), (2, -1.0)][:k]
    return [common_pb2.TokenLogprob(token_id=t, logprob=-0.25, rank=2,
                                    top=[common_pb2.TopLogprob(token_id=t + d, logprob=v) for d, v in top])
            for t in token_ids]


@dataclass
class FakeScheduler(scheduler_pb2_grpc.SchedulerServicer):
    """A scripted scheduler. Every request produces ``output_ids`` (or ``tokens_for(request)``)."""

    output_ids: list[int] = field(default_factory=lambda: [3 + b for b in b"Hello, world!"])
    tokens_for: Callable[[scheduler_pb2.SubmitRequest], list[int]] | None = None
    batch_size: int = 1
    token_delay_s: float = 0.001
    finish_reason: str = "stop"
    model: str = "fake-model"
    max_model_len: int = 64
    classes: dict[str, dict[str, float]] | None = None  # name -> SLOSpec fields; None: report no classes
    submit_error: tuple[grpc.StatusCode, str] | None = None
    submit_retry_after_ms: int | None = None  # sent with submit_error, as the scheduler's admission does
    submit_delay_s: float = 0.0          # Submit is accepted at once but answers this late
    vocab_size: int = 0                  # reported in ServerInfo (0 = unknown)
    break_after: int | None = None       # the stream breaks (UNAVAILABLE) at this index of a request's first watch
    rewind_on_resume: int = 0            # a re-watch resends this many tokens before start_index
    hold_at: int | None = None           # a request's first watch goes silent (stream open) at this index
    released: bool = False               # ... until this is set (then it goes on, on the same stream)
    get_request_status: str | None = None  # GetRequest says this, with the tokens sent so far (None:
                                           # "finished" with every token)
    get_request_error: tuple[grpc.StatusCode, str] | None = None
    get_requests: list[common_pb2.GetRequestRequest] = field(default_factory=list)
    submits: list[scheduler_pb2.SubmitRequest] = field(default_factory=list)
    watches: list[tuple[str, int]] = field(default_factory=list)  # (request id, start index) of every watch
    watch_many_messages: list[scheduler_pb2.WatchManyRequest] = field(default_factory=list)
    watch_many_streams: int = 0
    cancels: list[str] = field(default_factory=list)
    _requests: dict[str, _Record] = field(default_factory=dict)

    def id_of(self, label: str) -> str:
        """The request id the gateway made for the request a client labelled ``label`` ("" before
        its Submit arrived): ids are the gateway's, a client's own id is only its label."""
        return next((s.request_id for s in self.submits if s.label == label), "")

    def cancelled(self, label: str) -> bool:
        """Whether the request labelled ``label`` was cancelled here."""
        rid = self.id_of(label)
        return bool(rid) and rid in self.cancels

    async def _record(self, request_id: str, context: grpc.aio.ServicerContext) -> _Record:
        rec = self._requests.get(request_id)
        if rec is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"request {request_id} is unknown")
            raise AssertionError("unreachable: abort raises")
        return rec

    async def GetServerInfo(self, request: Any, context: grpc.aio.ServicerContext) -> scheduler_pb2.ServerInfo:
        classes = [scheduler_pb2.AppClass(name=n, slo=common_pb2.SLOSpec(**spec)) for n, spec in (self.classes or {}).items()]
        return scheduler_pb2.ServerInfo(model=self.model, max_model_len=self.max_model_len, block_size=16,
                                        live_workers=1, vocab_size=self.vocab_size, app_classes=[c.name for c in classes] or
                                        ["chat", "code", "summarization", "batch"], classes=classes)

    async def Submit(self, request: scheduler_pb2.SubmitRequest,
                     context: grpc.aio.ServicerContext) -> scheduler_pb2.SubmitResponse:
        self.submits.append(request)
        if self.submit_error is not None:
            if self.submit_retry_after_ms is not None:
                context.set_trailing_metadata((("retry-after-ms", str(self.submit_retry_after_ms)),))
            await context.abort(*self.submit_error)
        tokens = self.tokens_for(request) if self.tokens_for else list(self.output_ids)
        self._requests[request.request_id] = _Record(submit=request, tokens=tokens)
        await asyncio.sleep(self.submit_delay_s)
        return scheduler_pb2.SubmitResponse(request_id=request.request_id, slo=request.slo)

    async def WatchMany(self, request_iterator: Any, context: grpc.aio.ServicerContext
                        ) -> AsyncGenerator[scheduler_pb2.WatchManyResponse, None]:
        """Each watched request pumped by a task of its own into one outgoing queue; a break
        (``break_after``) ends the whole stream, as a scheduler restart would."""
        self.watch_many_streams += 1
        out: asyncio.Queue[scheduler_pb2.WatchManyResponse | _Refused] = asyncio.Queue()
        pumps: dict[str, asyncio.Task[None]] = {}

        async def pump(rid: str, start: int) -> None:
            try:
                async for batch in self._batches(rid, start):
                    batch.request_id = rid
                    out.put_nowait(scheduler_pb2.WatchManyResponse(batches=[batch]))
            except _Refused as exc:
                if exc.code == grpc.StatusCode.UNAVAILABLE:
                    out.put_nowait(exc)
                else:
                    out.put_nowait(scheduler_pb2.WatchManyResponse(errors=[scheduler_pb2.WatchError(
                        request_id=rid, code=exc.code.value[0], message=exc.message)]))

        async def read() -> None:
            async for msg in request_iterator:
                self.watch_many_messages.append(msg)
                for rid in msg.unwatch:
                    task = pumps.pop(rid, None)
                    if task is not None:
                        task.cancel()
                for w in msg.watch:
                    self.watches.append((w.request_id, w.start_index))
                    old = pumps.pop(w.request_id, None)
                    if old is not None:  # a re-watch restarts the request's stream from its index
                        old.cancel()
                    pumps[w.request_id] = asyncio.get_running_loop().create_task(pump(w.request_id, w.start_index))

        reader = asyncio.get_running_loop().create_task(read())
        try:
            while True:
                item = await out.get()
                if isinstance(item, _Refused):
                    await context.abort(item.code, item.message)
                yield item
        finally:
            reader.cancel()
            for task in pumps.values():
                task.cancel()

    async def _batches(self, request_id: str, start: int) -> AsyncGenerator[scheduler_pb2.TokenBatch, None]:
        rec = self._requests.get(request_id)
        if rec is None:
            raise _Refused(grpc.StatusCode.NOT_FOUND, f"request {request_id} is unknown")
        i = start
        if len(self.watches) > 1 and any(w[0] == request_id for w in self.watches[:-1]):
            i = max(0, i - self.rewind_on_resume)
        n, prompt = len(rec.tokens), len(rec.submit.prompt_token_ids)
        while True:
            if rec.cancelled:
                yield scheduler_pb2.TokenBatch(start_index=i, finished=True, finish_reason="abort",
                                               prompt_tokens=prompt)
                return
            if self.break_after is not None and not rec.broken and i >= self.break_after:
                rec.broken = True
                raise _Refused(grpc.StatusCode.UNAVAILABLE, "scheduler restarting")
            if self.hold_at is not None and not rec.held and i >= self.hold_at:
                rec.held = True  # silent, the stream open, until released (or this watch ends)
                while not self.released:
                    await asyncio.sleep(0.01)
            await asyncio.sleep(self.token_delay_s)
            ids = rec.tokens[i:i + self.batch_size]
            end = i + len(ids)
            rec.sent = max(rec.sent, end)
            yield scheduler_pb2.TokenBatch(token_ids=ids, start_index=i, emitted_at=[time.time()] * len(ids),
                                           finished=end >= n, finish_reason=self.finish_reason if end >= n else "",
                                           prompt_tokens=prompt)
            if end >= n:
                return
            i = end

    async def Cancel(self, request: common_pb2.CancelRequest,
                     context: grpc.aio.ServicerContext) -> common_pb2.CancelResponse:
        self.cancels.append(request.request_id)
        rec = await self._record(request.request_id, context)
        rec.cancelled = True
        return common_pb2.CancelResponse(cancelled=True)

    async def GetRequest(self, request: common_pb2.GetRequestRequest,
                         context: grpc.aio.ServicerContext) -> common_pb2.RequestState:
        self.get_requests.append(request)
        if self.get_request_error is not None:
            await context.abort(*self.get_request_error)
        rec = await self._record(request.request_id, context)
        status = self.get_request_status or "finished"
        output = rec.tokens if self.get_request_status is None else rec.tokens[:rec.sent]
        prompt = rec.submit.prompt_token_ids
        return common_pb2.RequestState(request_id=request.request_id, status=status, output_ids=output,
                                        finish_reason=self.finish_reason if status == "finished" else "",
                                        app_class=rec.submit.app_class, slo=rec.submit.slo,
                                        prompt_tokens=len(prompt), arrival_s=time.time(),
                                        tenant=rec.submit.tenant, label=rec.submit.label,
                                        prompt_token_ids=prompt if request.include_prompt else ())


async def start_fake_scheduler(fake: FakeScheduler, port: int = 0) -> tuple[grpc.aio.Server, int]:
    """Serve ``fake`` on 127.0.0.1 (``port`` 0 = any free port); returns the server and its port."""
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(fake, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, bound


class GatewayStack:
    """A fake scheduler and a real gateway (gRPC + HTTP on free ports) on one background loop."""

    def __init__(self, fake: FakeScheduler | None = None, **config: Any) -> None:
        from gateway.config import GatewayConfig
        from gateway.main import start_gateway

        self.loop = LoopThread()
        self.fake = fake if fake is not None else FakeScheduler()
        self._server, self.scheduler_port = self.loop.run(start_fake_scheduler(self.fake))
        self.config = GatewayConfig(**{"scheduler_address": f"127.0.0.1:{self.scheduler_port}", "host": "127.0.0.1",
                                       "grpc_port": 0, "http_port": 0, **config})
        self.handle = self.loop.run(start_gateway(self.config))

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.handle.grpc_port}"

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.handle.http_port}"

    def reset(self, **knobs: Any) -> FakeScheduler:
        """A fresh script for the next test (same ports, same gateway)."""
        fresh = FakeScheduler(**knobs)
        for name in fresh.__dataclass_fields__:
            setattr(self.fake, name, getattr(fresh, name))
        return self.fake

    def restart_scheduler(self, down_s: float = 0.2) -> None:
        """Stop the scheduler (in-flight WatchMany streams break), wait, serve again on the same port."""

        async def _restart() -> None:
            await self._server.stop(0)
            await asyncio.sleep(down_s)
            self._server, _ = await start_fake_scheduler(self.fake, self.scheduler_port)

        self.loop.run(_restart())

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.01)
        return predicate()

    def close(self) -> None:
        self.loop.run(self.handle.stop())
        self.loop.run(self._server.stop(0))
        self.loop.close()
