"""FailoverChannel: a client with a leader's and a standby's address leaves a wedged leader.

A SIGSTOPped process keeps its connections and its listening socket: the kernel keeps the TCP
connection up, nothing answers HTTP/2, and the channel keeps its connection (until keepalive
gives up) and then retries that address first. The campaign measured a minute before workers
reached the new leader. Here: two real server processes, the first SIGSTOPped once connected.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from accelgen.common.grpc_server import CHANNEL_OPTIONS, FailoverChannel, free_port

SERVER = """
import asyncio, sys
from accelgen.common.grpc_server import make_server, set_serving
async def main():
    server, health = make_server(["test.Service"])
    server.add_insecure_port("127.0.0.1:" + sys.argv[1])
    await server.start()
    await set_serving(health, ["test.Service"], True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


async def _answers(channel: grpc.aio.Channel, timeout_s: float = 1.0) -> bool:
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s,
                                                                  wait_for_ready=True)
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.aio.AioRpcError as exc:
        assert exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
        return False


def test_a_wedged_leader_is_left_for_the_next_address_after_two_failures() -> None:
    ports = [free_port(), free_port()]
    procs = [subprocess.Popen([sys.executable, "-c", SERVER, str(ports[0])])]

    async def until_answers(channel: grpc.aio.Channel) -> None:
        for _ in range(60):
            if await _answers(channel, 0.5):
                return
        raise AssertionError("a server did not come up")

    async def scenario() -> None:
        fc = FailoverChannel(",".join(f"127.0.0.1:{p}" for p in ports), CHANNEL_OPTIONS)
        try:
            await until_answers(fc.channel)  # connected to the leader, the only one up
            procs.append(subprocess.Popen([sys.executable, "-c", SERVER, str(ports[1])]))
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ports[1]}") as direct:
                await until_answers(direct)  # the new leader listens
            os.kill(procs[0].pid, signal.SIGSTOP)  # the leader wedges with the connection open
            assert not await _answers(fc.channel), "the wedged leader answers nothing"
            assert fc.failed() is False, "one failure is not enough to move on"
            assert not await _answers(fc.channel), "the channel stays on the wedged connection"
            assert fc.failed() is True and fc.generation == 1
            assert await _answers(fc.channel, 5.0), "the new channel reaches the next address"
        finally:
            await fc.close()

    try:
        asyncio.run(scenario())
    finally:
        for proc in procs:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()


def test_one_address_is_never_rotated() -> None:
    async def scenario() -> None:
        fc = FailoverChannel("127.0.0.1:1", CHANNEL_OPTIONS)
        assert [fc.failed() for _ in range(4)] == [False] * 4 and fc.generation == 0
        await fc.close()

    asyncio.run(scenario())


def test_a_list_must_be_ip_literals() -> None:
    with pytest.raises(ValueError, match="IP literals"):
        FailoverChannel("sched-a:50051,sched-b:50051", CHANNEL_OPTIONS)
