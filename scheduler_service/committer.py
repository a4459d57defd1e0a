"""The committer: each iteration made durable in Redis, in lane order, then handed to delivery.

A lane hands every applied iteration to its ``CommitChain``; the chain writes them one after
another (iteration k before k+1), each retried with backoff while Redis is down, and hands each
to delivery only once its write has landed: a client never sees a token that a restarted
scheduler would not know. A cancel's record goes on the same chain, so it lands after the
iterations before it (one of which may still say "running").
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Coroutine

import structlog

from scheduler_service.state.store import IterationChanges, RedisStore

log = structlog.get_logger("scheduler.committer")


class Committer:
    """Durable writes to the store; ``deliver`` gets each committed iteration's changes."""

    def __init__(self, store: RedisStore, deliver: Callable[[IterationChanges], None]) -> None:
        self.store = store
        self._deliver = deliver

    def chain(self) -> CommitChain:
        """The ordered write queue of one lane."""
        return CommitChain(self)

    async def write_durably(self, changes: IterationChanges) -> None:
        """One store write that must not be lost, retried with backoff while Redis is down."""
        delay = 0.05
        while True:
            try:
                await self.store.commit_iteration(changes)
                return
            except Exception as exc:
                log.warning("commit_retry", worker=changes.worker_id, error=str(exc))
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)

    async def commit(self, changes: IterationChanges) -> None:
        """Make one iteration durable (one Redis round trip), then deliver its tokens."""
        await self.write_durably(changes)  # Redis down: hold the tokens until they are durable
        self._deliver(changes)


class CommitChain:
    """One lane's writes, each started after every write queued before it."""

    def __init__(self, committer: Committer) -> None:
        self._committer = committer
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

    def _chain(self, write: Coroutine[Any, Any, None]) -> asyncio.Task:
        self.last = asyncio.create_task(_after(self.last, write))
        return self.last


async def _after(previous: asyncio.Task | None, write: Coroutine[Any, Any, None]) -> None:
    if previous is not None:
        await asyncio.wait({previous})  # its failure is its own (logged there); ours still runs
    await write
