"""The committer: each iteration made durable in Redis, in lane order, then handed to delivery.

A lane hands every applied iteration to its ``CommitChain``; the chain writes them one after
another (iteration k before k+1) and hands each to delivery only once its write has landed: a
client never sees a token that a restarted scheduler would not know. A cancel's record goes on
the same chain, so it lands after the iterations before it (one of which may still say "running").

**Failures** (``redis_conn.is_transient`` tells them apart):

- *transient* (Redis down, restarting, failing over, loading, out of memory): retried with backoff
  (up to 1 s apart) for as long as it takes; the tokens wait, undelivered.
- ``LeaseLost``: another scheduler leads. Logged ``commit_failed_permanent``; the write and every
  later one are given up without delivering anything (the store has already told the app, which
  stops serving; the new leader recomputes from what Redis holds).
- *permanent* (WRONGTYPE on one request's key, NOPERM, a script error): logged
  ``commit_failed_permanent``, then the iteration is written again request by request, once, so
  a bad key fails only its own request. The others are delivered as usual. A request whose write
  fails is **ended for its client with finish reason "abort"** after the tokens that were durable
  (its later tokens are neither written nor delivered), ``commit_request_failed`` names it and
  the error, and ``on_request_failed`` (if set) lets the app cancel it in its lane.

**Retries never duplicate tokens.** Tokens are APPENDed, and a write that failed may have landed
(a connection lost after the script ran; redis-py re-sends it). Each request's append carries the
number of tokens before it, and the store's script skips tokens already there.

**Lost writes are restored.** If Redis holds fewer tokens than were committed (a failover or a
crash lost acknowledged writes: ``OutputGap``), the request's output is set back to what its
clients were delivered (``history``, delivery's record of it) and the iteration written again,
so a later recovery does not produce a different output.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any, Callable, Coroutine

import structlog

from accelgen.core.logprobs import TokenLogprob
from accelgen.core.request import FinishReason, RequestStatus
from scheduler_service.state.redis_conn import is_lease_lost, is_transient
from scheduler_service.state.store import IterationChanges, OutputGap, RedisStore

log = structlog.get_logger("scheduler.committer")

MAX_BACKOFF_S = 1.0


class Committer:
    """Durable writes to the store; ``deliver`` gets each committed iteration's changes."""

    def __init__(self, store: RedisStore, deliver: Callable[[IterationChanges], None],
                 on_request_failed: Callable[[str, str], None] | None = None,
                 history: Callable[[str], tuple[list[int], list[float], list[TokenLogprob]] | None] | None = None
                 ) -> None:
        self.store = store
        self._deliver = deliver
        # request id -> (tokens, times, logprobs) its clients have been delivered (None: unknown here)
        self.history = history
        self.on_request_failed = on_request_failed  # (request id, error): e.g. cancel it in its lane
        self.failed: set[str] = set()  # requests whose write failed for good: nothing more is written
        self.lease_lost = False  # a write was fenced off: every later write is given up
        self.durable_lag_s: deque[float] = deque(maxlen=5000)  # iteration applied -> its write landed

    def chain(self) -> CommitChain:
        """The ordered write queue of one lane."""
        return CommitChain(self)

    async def write_durably(self, changes: IterationChanges) -> bool:
        """One store write that must not be lost: retried while Redis is down. True once written;
        False if it failed for good (logged; see the module docstring)."""
        landed, failed = await self._land(changes)
        return landed is not None and not failed

    async def commit(self, changes: IterationChanges) -> None:
        """Make one iteration durable, then deliver what landed (and end the requests that could
        not be written, with finish reason "abort")."""
        landed, failed = await self._land(changes)  # Redis down: hold the tokens until they are durable
        if landed is None:
            return
        if changes.applied_at:
            self.durable_lag_s.append(time.time() - changes.applied_at)
        for rid in failed:
            landed.status[rid] = (RequestStatus.CANCELLED, FinishReason.CANCELLED.value)
            landed.finished.append(rid)
        self._deliver(landed)

    # -- writing ------------------------------------------------------------------------------
    async def _land(self, changes: IterationChanges) -> tuple[IterationChanges | None, dict[str, str]]:
        """Write ``changes``: (what landed, {request id: why its write failed}); (None, {}) when
        the lease is lost."""
        if self.lease_lost:
            return None, {}
        ended = self.failed.intersection(changes.finished)
        changes = _without(changes, self.failed)
        self.failed -= ended  # ended in its lane: the id may be reused by a new request
        if not _request_ids(changes):
            return changes, {}
        error = await self._write(changes)
        if error is None:
            return changes, {}
        log.error("commit_failed_permanent", worker=changes.worker_id, requests=len(_request_ids(changes)),
                  error=_describe(error), lease_lost=is_lease_lost(error))
        if is_lease_lost(error):
            self.lease_lost = True
            return None, {}
        return await self._isolate(changes)

    async def _isolate(self, changes: IterationChanges) -> tuple[IterationChanges | None, dict[str, str]]:
        """The iteration again, request by request, once: one bad key fails only its request."""
        landed = IterationChanges(worker_id=changes.worker_id)
        failed: dict[str, str] = {}
        for rid in _request_ids(changes):
            part = _only(changes, rid)
            error = await self._write(part)
            if error is not None and is_lease_lost(error):
                self.lease_lost = True
                return None, {}
            if error is None:
                _merge(landed, part)
                continue
            failed[rid] = _describe(error)
            self.failed.add(rid)
            log.error("commit_request_failed", worker=changes.worker_id, request=rid, error=failed[rid],
                      client_sees="finish_reason abort")
        for rid, why in failed.items():
            if self.on_request_failed is not None:
                self.on_request_failed(rid, why)
        return landed, failed

    async def _write(self, changes: IterationChanges) -> BaseException | None:
        """Write, retrying transient failures with backoff for as long as they last (the write is
        idempotent), restoring outputs Redis lost; the permanent error, or None once written."""
        delay = 0.05
        while True:
            try:
                await self.store.commit_iteration(changes)
                return None
            except OutputGap as gap:
                error = await self._restore(changes, gap)
                if error is not None:
                    return error
                continue
            except Exception as exc:  # noqa: BLE001 - classified here
                if not is_transient(exc):
                    return exc
                log.warning("commit_retry", worker=changes.worker_id, error=_describe(exc))
            await asyncio.sleep(delay)
            delay = min(MAX_BACKOFF_S, delay * 2)

    async def _restore(self, changes: IterationChanges, gap: OutputGap) -> BaseException | None:
        """Set the outputs Redis lost back to what was delivered before this iteration."""
        for rid in gap.request_ids:
            known = self.history(rid) if self.history is not None else None
            if known is None or len(known[0]) != changes.offsets.get(rid):
                return gap  # nothing to restore from: permanent for this request (isolated, aborted)
            log.error("output_restored", worker=changes.worker_id, request=rid, tokens=len(known[0]))
            try:
                await self.store.restore_output(rid, *known)
            except Exception as exc:  # noqa: BLE001 - a transient error: the commit's retry tries again
                if not is_transient(exc):
                    return exc
        return None


class CommitChain:
    """One lane's writes, each started after every write queued before it."""

    def __init__(self, committer: Committer) -> None:
        self._committer = committer
        self.store = committer.store  # where this lane's writes go (and its lease, for the plans' fence)
        self.last: asyncio.Task | None = None  # the newest write; each waits for the one before

    def iteration(self, changes: IterationChanges) -> asyncio.Task:
        """Write an iteration's changes, then deliver them."""
        return self._chain(self._committer.commit(changes))

    def record(self, changes: IterationChanges) -> asyncio.Task:
        """Write changes already delivered (a cancel's record), behind the iterations before it."""
        return self._chain(self._committer.write_durably(changes))

    async def drain(self, timeout_s: float | None = None) -> None:
        """Wait (up to ``timeout_s``; None: as long as Redis takes) for every queued write."""
        if self.last is not None:
            await asyncio.wait({self.last}, timeout=timeout_s)

    def _chain(self, write: Coroutine[Any, Any, Any]) -> asyncio.Task:
        self.last = asyncio.create_task(_after(self.last, write))
        return self.last


async def _after(previous: asyncio.Task | None, write: Coroutine[Any, Any, Any]) -> None:
    if previous is not None:
        await asyncio.wait({previous})  # its failure is its own (logged there); ours still runs
    await write


# -- changes, request by request -------------------------------------------------------------
def _request_ids(ch: IterationChanges) -> list[str]:
    """Every request an iteration touches, in a stable order."""
    return list(dict.fromkeys([*ch.tokens, *ch.status, *ch.preemptions, *ch.finished, *ch.truncate]))


def _only(ch: IterationChanges, rid: str) -> IterationChanges:
    return IterationChanges(
        worker_id=ch.worker_id, tokens={rid: ch.tokens[rid]} if rid in ch.tokens else {},
        status={rid: ch.status[rid]} if rid in ch.status else {},
        preemptions={rid: ch.preemptions[rid]} if rid in ch.preemptions else {},
        finished=[rid] if rid in ch.finished else [],
        offsets={rid: ch.offsets[rid]} if rid in ch.offsets else {},
        logprobs={rid: ch.logprobs[rid]} if rid in ch.logprobs else {},
        truncate={rid: ch.truncate[rid]} if rid in ch.truncate else {})


def _without(ch: IterationChanges, rids: set[str]) -> IterationChanges:
    if not rids or not rids.intersection(_request_ids(ch)):
        return ch
    return IterationChanges(
        worker_id=ch.worker_id, tokens={r: v for r, v in ch.tokens.items() if r not in rids},
        status={r: v for r, v in ch.status.items() if r not in rids},
        preemptions={r: v for r, v in ch.preemptions.items() if r not in rids},
        finished=[r for r in ch.finished if r not in rids],
        offsets={r: v for r, v in ch.offsets.items() if r not in rids},
        logprobs={r: v for r, v in ch.logprobs.items() if r not in rids},
        truncate={r: v for r, v in ch.truncate.items() if r not in rids})


def _merge(into: IterationChanges, part: IterationChanges) -> None:
    into.tokens.update(part.tokens)
    into.status.update(part.status)
    into.preemptions.update(part.preemptions)
    into.finished.extend(part.finished)
    into.offsets.update(part.offsets)
    into.logprobs.update(part.logprobs)
    into.truncate.update(part.truncate)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
