"""The owner book in a real Redis: owners survive a scheduler restart, and the restarted
scheduler gives every owner a fresh grace period instead of cancelling at once."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from launcher.stack import start_redis
from scheduler_service.owners import OwnerBook
from scheduler_service.state.store import RedisStore

pytestmark = pytest.mark.integration


@dataclass(eq=False)
class Channel:
    finished: bool = False
    watchers: set[Any] = field(default_factory=set)


def test_owners_are_durable_and_get_a_fresh_grace_period_after_a_restart() -> None:
    proc, url = start_redis(key_prefix=None)  # prefix t:

    async def run() -> None:
        store = RedisStore(url, prefix="t:")
        try:
            before = OwnerBook(store, {"a": Channel(), "b": Channel(), "c": Channel()})
            before.cancel_after_s, before.enabled = 5.0, True
            before.submitted("a", "gw1")
            before.submitted("b", "gw1")
            before.submitted("c", "gw2")
            await before._flush()
            before.finished("c")
            await before._flush()
            assert await store.redis.hgetall("t:owner") == {b"a": b"gw1", b"b": b"gw1"}

            # The restarted scheduler recovered "a" only ("b" finished while it was down).
            restart = time.monotonic()
            after = OwnerBook(store, {"a": Channel(), "b": Channel(finished=True)})
            after.cancel_after_s, after.enabled = 5.0, True
            assert await after._load()
            assert after.owner_of == {"a": "gw1"}
            assert after.gone_since["gw1"] >= restart  # fresh: nothing is due before 5 s from now
            assert after.due(restart + 4.9) == []
            assert after.due(after.gone_since["gw1"] + 5) == [("gw1", ["a"], 0)]
            await after._flush()
            assert await store.redis.hgetall("t:owner") == {b"a": b"gw1"}
        finally:
            await store.close()

    try:
        asyncio.run(run())
    finally:
        proc.stop()
