"""A sim worker driven in process, standing in for a lane's gRPC stub (``lane.link.stub``).

Both transports go through the real ``WorkerServicer``: ``ExecuteIteration`` directly, and
``ExecuteStream`` as a ``StreamStreamCall`` would drive it, so the lane pipelines plans exactly
as it does against a worker process. Every iteration yields to the event loop, as a real one
does; ``hang`` makes every iteration wait for ever (requests stay live).
"""

from __future__ import annotations

import asyncio

import grpc

from accelgen.v1 import worker_pb2
from worker_service.executors.sim import SimExecutor
from worker_service.server import WorkerServicer


class AbortingContext:
    """The part of ``ServicerContext`` the worker uses: ``abort`` raises the status."""

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class InProcessWorker:
    def __init__(self, hang: bool = False) -> None:
        self.servicer = WorkerServicer(SimExecutor(time_scale=0))
        self.hang = hang

    async def iteration_yield(self) -> None:
        if self.hang:
            await asyncio.Event().wait()
        await asyncio.sleep(0.002)

    async def ExecuteIteration(self, msg: worker_pb2.BatchPlan, timeout: float | None = None):
        await self.iteration_yield()
        return self.received(await self.servicer.ExecuteIteration(msg, AbortingContext()))

    def ExecuteStream(self) -> "InProcessStream":
        return InProcessStream(self)

    def received(self, reply: worker_pb2.IterationResult) -> worker_pb2.IterationResult:
        """What the lane gets for ``reply`` (a test subclass may garble it)."""
        return reply


class InProcessStream:
    def __init__(self, worker: InProcessWorker) -> None:
        self.worker = worker
        self.plans: asyncio.Queue = asyncio.Queue()
        self.results = worker.servicer.ExecuteStream(self._requests(), AbortingContext())

    async def _requests(self):
        while (msg := await self.plans.get()) is not None:
            yield msg

    async def write(self, msg: worker_pb2.BatchPlan) -> None:
        self.plans.put_nowait(msg)

    async def read(self):
        await self.worker.iteration_yield()
        try:
            return self.worker.received(await self.results.__anext__())
        except StopAsyncIteration:
            return grpc.aio.EOF

    def cancel(self) -> None:
        self.plans.put_nowait(None)
