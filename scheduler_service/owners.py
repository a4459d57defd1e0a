"""Which gateway owns which request, and cancelling the requests of a gateway that is gone.

A gateway submits with ``owner`` = its instance id and names itself on its WatchMany streams.
When an owner has had no stream open for ``owner_gone_cancel_s`` (the gateway died, or lost the
scheduler for that long), its unfinished requests that no stream watches are cancelled through
the normal cancel path (durable, and delivered as ``abort`` to anyone who watches later): nobody
will read their tokens, and they hold queue places and KV blocks. A request that another
owner's stream watches becomes that owner's (a client re-attached through another gateway).
Requests without an owner (direct gRPC clients of the scheduler) are never cancelled this way.

Owners are kept in the Redis hash ``{prefix}owner`` (request id -> owner), written in the
background once a tick (a request whose owner was not yet written when the scheduler died is
simply not auto-cancelled). A (re)started scheduler reads it and gives every owner a fresh grace
period, so a restart does not cancel everything at once: gateways re-open their streams within
seconds.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable, Protocol

import structlog

from scheduler_service.state.store import RedisStore

log = structlog.get_logger("scheduler.owners")

CancelFn = Callable[[str], Awaitable[object]]


class _Channel(Protocol):
    """What the book reads of a ``delivery.RequestChannel`` (delivery imports this module)."""

    finished: bool
    watchers: set[Any]  # WatchSessions, each with its ``owner``


class OwnerBook:
    """Owners of unfinished requests, open streams per owner, and the sweep that cancels."""

    def __init__(self, store: RedisStore, channels: dict[str, _Channel]) -> None:
        self.store = store
        self.channels = channels
        self.owner_of: dict[str, str] = {}
        self.requests_of: dict[str, set[str]] = {}
        self.streams: dict[str, int] = {}        # owner -> WatchMany streams open now
        self.gone_since: dict[str, float] = {}   # owner -> monotonic time its last stream closed
        self._to_write: dict[str, str] = {}      # request id -> owner, not yet in Redis
        self._to_forget: set[str] = set()        # finished request ids to drop from Redis
        self._task: asyncio.Task[None] | None = None
        self.cancel_after_s = 0.0
        self.enabled = False  # owner_gone_cancel_s = 0, or not started: track nothing

    # -- bookkeeping (no I/O) -------------------------------------------------------------------
    def submitted(self, request_id: str, owner: str) -> None:
        self._drop(request_id)
        if not owner or not self.enabled:
            return
        self._set(request_id, owner)
        if not self.streams.get(owner):  # a Submit is a sign of life: its stream opens right after
            self.gone_since[owner] = time.monotonic()

    def watched_by(self, request_id: str, owner: str) -> None:
        """A stream of ``owner`` watches the request: an owned request of another owner moves."""
        current = self.owner_of.get(request_id)
        if owner and current and current != owner and self.enabled:
            log.info("owner_changed", request_id=request_id, old=current, new=owner)
            self._set(request_id, owner)

    def finished(self, request_id: str) -> None:
        if self._drop(request_id):
            self._to_forget.add(request_id)

    def stream_opened(self, owner: str) -> None:
        self.streams[owner] = self.streams.get(owner, 0) + 1
        self.gone_since.pop(owner, None)

    def stream_closed(self, owner: str) -> None:
        n = self.streams.get(owner, 0) - 1
        if n > 0:
            self.streams[owner] = n
            return
        self.streams.pop(owner, None)
        if self.requests_of.get(owner):
            self.gone_since[owner] = time.monotonic()

    def _set(self, request_id: str, owner: str) -> None:
        self._drop(request_id)
        self.owner_of[request_id] = owner
        self.requests_of.setdefault(owner, set()).add(request_id)
        self._to_write[request_id] = owner
        self._to_forget.discard(request_id)

    def _drop(self, request_id: str) -> bool:
        owner = self.owner_of.pop(request_id, None)
        if owner is None:
            return False
        self._to_write.pop(request_id, None)
        rids = self.requests_of.get(owner)
        if rids is not None:
            rids.discard(request_id)
            if not rids:
                del self.requests_of[owner]
                self.gone_since.pop(owner, None)
        return True

    def due(self, now: float) -> list[tuple[str, list[str], int]]:
        """Owners gone ``cancel_after_s``: (owner, requests to cancel, requests moved to a
        watching stream's owner). Requests watched only by ownerless streams stay, and are
        looked at again next time."""
        out = []
        for owner, since in list(self.gone_since.items()):
            if self.streams.get(owner) or now - since < self.cancel_after_s:
                continue
            cancel, moved = [], 0
            for rid in list(self.requests_of.get(owner, ())):
                ch = self.channels.get(rid)
                if ch is None or ch.finished:
                    self.finished(rid)
                    continue
                watchers = [s.owner for s in ch.watchers if s.owner]
                if watchers:
                    self._set(rid, watchers[0])
                    moved += 1
                elif not ch.watchers:
                    cancel.append(rid)
            if not self.requests_of.get(owner):
                self.gone_since.pop(owner, None)
            out.append((owner, cancel, moved))
        return out

    # -- the sweep --------------------------------------------------------------------------------
    def start(self, cancel: CancelFn, cancel_after_s: float) -> None:
        """Run the sweep (after recovery: the channels of recovered requests exist)."""
        self.cancel_after_s = cancel_after_s
        self.enabled = cancel_after_s > 0
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(cancel), name="owner-sweep")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self, cancel: CancelFn) -> None:
        tick = min(1.0, max(0.05, self.cancel_after_s / 4))
        while not await self._load():
            await asyncio.sleep(tick)
        while True:
            await asyncio.sleep(tick)
            await self._flush()
            for owner, rids, moved in self.due(time.monotonic()):
                cancelled = 0
                for rid in rids:
                    try:
                        await cancel(rid)
                        cancelled += 1
                    except Exception as exc:  # noqa: BLE001 - finished meanwhile (NOT_FOUND) or Redis away
                        log.info("owner_gone_cancel_failed", request_id=rid, error=str(exc))
                    self.finished(rid)
                log.warning("owner_gone", owner=owner, gone_s=self.cancel_after_s, cancelled=cancelled,
                            moved=moved, watched_elsewhere=len(self.requests_of.get(owner, ())))

    async def _load(self) -> bool:
        """The owners of the recovered requests, each with a fresh grace period."""
        try:
            raw = await self.store.load_owners()
        except Exception as exc:  # noqa: BLE001 - Redis away: try again next tick
            log.warning("owners_load_failed", error=str(exc))
            return False
        now = time.monotonic()
        for rid, owner in raw.items():
            ch = self.channels.get(rid)
            if ch is None or ch.finished:
                self._to_forget.add(rid)
            elif rid not in self.owner_of:
                self._set(rid, owner)
                self._to_write.pop(rid, None)  # already there
        for owner in self.requests_of:
            if not self.streams.get(owner):
                self.gone_since[owner] = now
        log.info("owners_loaded", owners=len(self.requests_of), requests=len(self.owner_of))
        return True

    async def _flush(self) -> None:
        if not self._to_write and not self._to_forget:
            return
        write, forget = self._to_write, self._to_forget
        self._to_write, self._to_forget = {}, set()
        try:
            await self.store.write_owners(write, forget)
        except Exception as exc:  # noqa: BLE001 - Redis away: keep them for the next tick
            log.warning("owners_write_failed", error=str(exc))
            self._to_write = {**write, **self._to_write}
            self._to_forget |= forget - set(self._to_write)
