"""Fire-and-forget work of the scheduler (drops, deferred records, registry refreshes), kept
referenced until it ends (asyncio holds only weak references) and logged if it fails."""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine

import structlog

log = structlog.get_logger("scheduler.tasks")


class Background:
    def __init__(self) -> None:
        self.tasks: set[asyncio.Task] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        """Run ``coro`` in the background."""
        return self.track(asyncio.create_task(coro))

    def track(self, task: asyncio.Task) -> asyncio.Task:
        """Keep ``task`` referenced until it ends, and log its failure instead of losing it."""
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background_task_failed", task=task.get_name(), error=repr(task.exception()))
