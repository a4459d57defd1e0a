"""A call cut by the gateway replacing its scheduler channel is UNAVAILABLE, not a crash.

grpc.aio ends a call whose channel is closed by raising CancelledError in the caller; unhandled,
that was an HTTP 500 in the fault campaign (stop_scheduler). A real cancellation of the caller
must still propagate.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from gateway.scheduler_client import _survive_channel_change


def test_a_call_ended_by_its_channel_closing_is_unavailable() -> None:
    async def cut() -> None:
        raise asyncio.CancelledError()

    async def scenario() -> None:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _survive_channel_change(cut())
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "retry" in (err.value.details() or "")

    asyncio.run(scenario())


def test_a_caller_really_cancelled_stays_cancelled() -> None:
    async def scenario() -> None:
        started = asyncio.Event()

        async def slow() -> None:
            started.set()
            await asyncio.sleep(10)

        task = asyncio.create_task(_survive_channel_change(slow()))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
