"""The gateway's only door to the scheduler: Submit, a resumable watch, Cancel, GetRequest.

Tokens of every request come over one shared WatchMany stream (``gateway.watch_hub``); a
second watcher of a request already on it gets a stream of its own (another hub).

Both front ends (gRPC and OpenAI HTTP) go through this module, so they share deadlines,
reconnection and error behaviour.

Resumable watch: the scheduler keeps every request's tokens in Redis, so a token stream that
breaks (the scheduler restarting, a network blip) is resumed by watching again from the
number of tokens already delivered. Tokens before that index are dropped if the scheduler
resends them, so the consumer sees each token exactly once, in order. We keep trying with
exponential backoff until ``reconnect_timeout_s`` passes without progress.

Silent streams: a request that gets nothing for ``stream_idle_timeout_s`` is checked with
GetRequest. Progress the stream did not deliver means the shared stream is stuck (open but
silent): it is re-opened, and every request on it re-subscribes from its delivered index. A
request still queued or running without new tokens is waited for (a long queue wait is
legitimate). A scheduler that does not answer the check fails the request with UNAVAILABLE once
``reconnect_timeout_s`` has passed.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncGenerator, Awaitable, TypeVar

import grpc
import structlog

from accelgen.common.grpc_server import CHANNEL_OPTIONS, FailoverChannel
from accelgen.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from gateway.config import GatewayConfig
from gateway.errors import GatewayError
from gateway.watch_hub import IDLE, WatchHub

log = structlog.get_logger("gateway.scheduler_client")
T = TypeVar("T")

# gRPC's default reconnect backoff grows to 120 s: after a minute-long scheduler restart the
# channel could sit idle for another minute. Cap it so a restarted scheduler is found quickly.
GATEWAY_CHANNEL_OPTIONS = CHANNEL_OPTIONS + [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

# Codes after which the request may still be running at the scheduler: watch again. UNAVAILABLE
# is a restart or lost connection; CANCELLED reaches us only when the *server* cancelled the
# stream (shutting down), since our own cancellation surfaces as asyncio.CancelledError; and
# DEADLINE_EXCEEDED is the end of a stream's deadline, not of the request.
RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED})

BACKOFF_INITIAL_S = 0.05
BACKOFF_MAX_S = 1.0

DONE_STATES = frozenset({"finished", "cancelled"})  # a request's status once it is over


class SchedulerClient:
    """Calls to the scheduler (one address, or a leader and its standbys), each with a deadline;
    ServerInfo cached with a TTL."""

    def __init__(self, config: GatewayConfig) -> None:
        self._config = config
        self.owner = config.instance_id
        self._failover = FailoverChannel(config.scheduler_address, GATEWAY_CHANNEL_OPTIONS, transport=config.transport,
                                         peer_role="scheduler")
        self._stub_generation = self._failover.generation
        self._current_stub = scheduler_pb2_grpc.SchedulerStub(self._failover.channel)
        self._hubs = [WatchHub(lambda: self._stub, self.owner)]  # more only while a request has two watchers
        self._info: scheduler_pb2.ServerInfo | None = None
        self._info_at = -float("inf")
        self._info_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        # Set while the gateway shuts down: streams cut then are the gateway's doing, not the
        # client's, so their requests keep running (a client can still GetRequest the output).
        self.draining = False

    @property
    def channel(self) -> grpc.aio.Channel:
        return self._failover.channel

    @property
    def _stub(self) -> scheduler_pb2_grpc.SchedulerStub:
        """A stub on the current channel (a new one after ``scheduler_unreachable`` replaced it)."""
        if self._stub_generation != self._failover.generation:
            self._stub_generation = self._failover.generation
            self._current_stub = scheduler_pb2_grpc.SchedulerStub(self._failover.channel)
        return self._current_stub

    def scheduler_answered(self) -> None:
        self._failover.succeeded()

    def scheduler_unreachable(self) -> None:
        """A readiness check got no answer. Twice in a row with several scheduler addresses, the
        channel is replaced, trying the next address first (a wedged leader keeps a connection
        alive at the TCP level); watch streams on the old channel break and resume on the new."""
        if self._failover.failed():
            log.warning("scheduler_channel_rotated", generation=self._failover.generation)

    async def close(self) -> None:
        for hub in self._hubs:
            hub.close()
        if self._background:
            await asyncio.wait(self._background, timeout=self._config.rpc_timeout_s)
        await self._failover.close()

    async def server_info(self, refresh: bool = False) -> scheduler_pb2.ServerInfo:
        """The scheduler's model and limits, refreshed at most every ``server_info_ttl_s``
        (or now, with ``refresh``)."""
        async with self._info_lock:  # many requests arriving at once make one call, not many
            if refresh or self._info is None or time.monotonic() - self._info_at > self._config.server_info_ttl_s:
                self._info = await _survive_channel_change(self._stub.GetServerInfo(
                    scheduler_pb2.GetServerInfoRequest(), timeout=self._config.rpc_timeout_s))
                self._info_at = time.monotonic()
            return self._info

    async def submit(self, request: scheduler_pb2.SubmitRequest) -> scheduler_pb2.SubmitResponse:
        """Hand the request to the scheduler; once this returns it is durable there. It carries
        this gateway's id as its owner (cancelled by the scheduler if this gateway dies)."""
        request.owner = self.owner
        return await _survive_channel_change(self._stub.Submit(request, timeout=self._config.submit_timeout_s))

    async def cancel(self, request_id: str, stop_at: int | None = None) -> common_pb2.CancelResponse:
        """Cancel ``request_id``; with ``stop_at``, finish it instead as "stop" with its first
        ``stop_at`` output tokens (a stop string completed at that token)."""
        msg = common_pb2.CancelRequest(request_id=request_id)
        if stop_at is not None:
            msg.finish_reason, msg.keep_output_tokens = "stop", stop_at
        return await _survive_channel_change(self._stub.Cancel(msg, timeout=self._config.rpc_timeout_s))

    async def get_request(self, request_id: str, include_prompt: bool = False) -> common_pb2.RequestState:
        return await _survive_channel_change(self._stub.GetRequest(
            common_pb2.GetRequestRequest(request_id=request_id, include_prompt=include_prompt),
            timeout=self._config.rpc_timeout_s))

    def cancel_in_background(self, request_id: str, stop_at: int | None = None) -> None:
        """Cancel an abandoned request without blocking (the caller is usually being cancelled);
        ``stop_at``: finish it as "stop" with that many output tokens (``cancel``)."""
        if self.draining and stop_at is None:  # a stop string's end is the request's own: still sent
            log.info("request_left_running", request_id=request_id, reason="gateway shutting down")
            return

        async def _cancel() -> None:
            try:
                await self.cancel(request_id, stop_at)
                log.info("request_abandoned_cancelled" if stop_at is None else "request_stopped_at_scheduler",
                         request_id=request_id)
            except grpc.aio.AioRpcError as exc:  # already finished (NOT_FOUND) or scheduler away
                log.info("request_abandoned_cancel_failed", request_id=request_id, code=exc.code().name)

        task = asyncio.get_running_loop().create_task(_cancel())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def watch(self, request_id: str, start_index: int = 0) -> AsyncGenerator[scheduler_pb2.TokenBatch, None]:
        """Batches of new tokens from ``start_index`` on, each token once, until one is finished.

        Re-watches after a resumable break; raises UNAVAILABLE once ``reconnect_timeout_s`` has
        passed since the stream broke (or went silent with the scheduler unreachable) without a
        token arriving, and passes any other scheduler error through.
        """
        next_index = start_index
        broken_since: float | None = None
        backoff = BACKOFF_INITIAL_S
        while True:
            hub = self._hub_for(request_id)
            stream = hub.watch(request_id, next_index, self._config.stream_idle_timeout_s)
            reason = "stream ended before the request finished"
            try:
                async for batch in stream:
                    if batch is IDLE:
                        action, why = await self._check_silent(request_id, next_index)
                        if action == "wait":  # queued or running without new tokens: legitimate
                            broken_since = None
                            continue
                        reason = why
                        if action == "unreachable":
                            broken_since = time.monotonic() if broken_since is None else broken_since
                            if time.monotonic() - broken_since < self._config.reconnect_timeout_s:
                                continue
                            break
                        if (action == "restart" and hub.silent_for() >= self._config.stream_idle_timeout_s
                                and hub.restart(f"request {request_id}: {why}")):
                            # The whole shared stream is stuck: every request on it re-subscribes
                            # (this one gets the restart as UNAVAILABLE on its next read).
                            continue
                        break  # only this request is silent: re-watch it from its index
                    fresh = _trim(batch, next_index)
                    if fresh is None:  # a gap: the stream skipped tokens; re-watch from ours
                        reason = f"gap: expected token {next_index}, stream sent {batch.start_index}"
                        break
                    broken_since, backoff = None, BACKOFF_INITIAL_S
                    if not fresh.token_ids and not fresh.finished:
                        continue
                    next_index += len(fresh.token_ids)
                    yield fresh
                    if fresh.finished:
                        return
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RESUMABLE:
                    raise
                reason = f"{exc.code().name}: {exc.details()}"
            finally:
                await stream.aclose()
            now = time.monotonic()
            broken_since = now if broken_since is None else broken_since
            waited = now - broken_since
            if waited >= self._config.reconnect_timeout_s:
                raise GatewayError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"lost the token stream of request {request_id} after {next_index} tokens and could not "
                    f"resume it for {waited:.0f} s ({reason}); the request may still finish: GetRequest "
                    f"{request_id} returns its output, Attach resumes it from token {next_index}")
            log.info("watch_resume", request_id=request_id, from_index=next_index, reason=reason,
                     backoff_s=backoff)
            await asyncio.sleep(min(backoff, self._config.reconnect_timeout_s - waited))
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _check_silent(self, request_id: str, next_index: int) -> tuple[str, str]:
        """What to do about a request whose stream said nothing for ``stream_idle_timeout_s``:
        ``wait`` (nothing new at the scheduler), ``restart`` (it has progress the stream did not
        deliver), ``unreachable`` (the check failed: retried until ``reconnect_timeout_s``) or
        ``rewatch`` (another answer: watching again surfaces it)."""
        try:
            state = await self.get_request(request_id)
        except grpc.aio.AioRpcError as exc:
            log.warning("watch_silent_check_failed", request_id=request_id, code=exc.code().name)
            action = "unreachable" if exc.code() in RESUMABLE else "rewatch"
            return action, f"the stream is silent and GetRequest failed: {exc.code().name}: {exc.details()}"
        if len(state.output_ids) > next_index or state.status in DONE_STATES:
            log.warning("watch_silent", request_id=request_id, delivered=next_index,
                        scheduler_tokens=len(state.output_ids), status=state.status)
            return "restart", (f"silent for {self._config.stream_idle_timeout_s:g} s while the scheduler has "
                               f"{len(state.output_ids)} tokens (status {state.status}), {next_index} delivered")
        return "wait", ""

    def _hub_for(self, request_id: str) -> WatchHub:
        """The gateway's shared WatchMany stream; a request already watched there (a second
        watcher) goes on another hub's stream."""
        hub = next((h for h in self._hubs if h.can_watch(request_id)), None)
        if hub is None:
            hub = WatchHub(lambda: self._stub, self.owner)
            self._hubs.append(hub)
        return hub


async def _survive_channel_change(call: Awaitable[T]) -> T:
    """A call in flight on a channel that ``scheduler_unreachable`` replaced ends with the channel:
    grpc.aio raises CancelledError in the caller, which is not being cancelled. That is the
    scheduler being unreachable (UNAVAILABLE, retryable), not a gateway error (it was an HTTP 500)."""
    try:
        return await call
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # our caller is really being cancelled
        raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                   details="the scheduler stopped answering and its channel was replaced; retry"
                                   ) from None


def _trim(batch: scheduler_pb2.TokenBatch, next_index: int) -> scheduler_pb2.TokenBatch | None:
    """The part of ``batch`` from ``next_index`` on; None when it starts beyond (a gap)."""
    if batch.start_index > next_index:
        return None
    skip = next_index - batch.start_index
    if skip <= 0:
        return batch
    out = scheduler_pb2.TokenBatch(token_ids=batch.token_ids[skip:], start_index=next_index,
                                   emitted_at=batch.emitted_at[skip:], finished=batch.finished,
                                   finish_reason=batch.finish_reason, prompt_tokens=batch.prompt_tokens,
                                   logprobs=batch.logprobs[skip:])  # aligned with token_ids (or empty)
    return out
