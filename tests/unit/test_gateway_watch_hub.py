"""The WatchMany request side: what a burst of watch/unwatch calls becomes on the wire."""

from __future__ import annotations

import asyncio

import pytest

from accelgen.v1 import scheduler_pb2
from gateway.watch_hub import _requests

pytestmark = pytest.mark.unit


def _watch(rid: str, start: int = 0) -> scheduler_pb2.WatchManyRequest:
    return scheduler_pb2.WatchManyRequest(watch=[scheduler_pb2.WatchRequest(request_id=rid, start_index=start)])


def _unwatch(rid: str) -> scheduler_pb2.WatchManyRequest:
    return scheduler_pb2.WatchManyRequest(unwatch=[rid])


def _first_message(*queued: scheduler_pb2.WatchManyRequest) -> scheduler_pb2.WatchManyRequest:
    async def run() -> scheduler_pb2.WatchManyRequest:
        outbox: asyncio.Queue = asyncio.Queue()
        for msg in queued:
            outbox.put_nowait(msg)
        return await _requests(outbox).__anext__()

    return asyncio.run(run())


def test_a_burst_becomes_one_message() -> None:
    msg = _first_message(_watch("a"), _watch("b", 3), _unwatch("c"))
    assert [(w.request_id, w.start_index) for w in msg.watch] == [("a", 0), ("b", 3)]
    assert list(msg.unwatch) == ["c"]


def test_only_the_last_operation_on_a_request_survives() -> None:
    # The scheduler applies a message's unwatches before its watches: "watch r, unwatch r" sent
    # as both would leave r watched with nobody reading it.
    msg = _first_message(_watch("r"), _unwatch("r"), _unwatch("s"), _watch("s", 7), _watch("t", 1), _watch("t", 4))
    assert [(w.request_id, w.start_index) for w in msg.watch] == [("s", 7), ("t", 4)]
    assert list(msg.unwatch) == ["r"]
