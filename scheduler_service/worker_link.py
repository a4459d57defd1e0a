"""The per-step transport between a lane and its worker.

One long-lived ``ExecuteStream`` per lane: plans go out as they are decided and results come
back in order, so a lane can send plan k+1 while the worker runs plan k (pipelining), and no
iteration pays for a new call (a unary call per iteration costs its own HTTP/2 stream, headers,
deadline and, with TLS, per-call authorisation).

A worker that does not serve ``ExecuteStream`` (an older worker during a rolling upgrade)
answers UNIMPLEMENTED before running anything; the link then falls back to one
``ExecuteIteration`` per plan, resending the plans the stream never ran, in order, and reports
``streaming = False`` so the lane stops pipelining (unary calls in flight together could reach
the worker's executor out of order). Until the stream's first result proves it is served, later
plans wait here instead of on the wire: a write racing the UNIMPLEMENTED answer would turn the
call's status into a local INTERNAL error, indistinguishable from a broken worker.
"""

from __future__ import annotations

import asyncio
from collections import deque

import grpc
import structlog

from accelgen.v1 import worker_pb2, worker_pb2_grpc

log = structlog.get_logger("scheduler.worker_link")


class LinkTimeout(Exception):
    """No result within the lane's per-iteration deadline."""


class WorkerLink:
    def __init__(self, stub: worker_pb2_grpc.WorkerStub, worker_id: str, timeout_s: float,
                 use_stream: bool = True) -> None:
        self.stub = stub
        self.worker_id = worker_id
        self.timeout_s = timeout_s
        self.streaming = use_stream
        self._call: grpc.aio.StreamStreamCall | None = None
        self._unanswered: deque[worker_pb2.BatchPlan] = deque()  # sent, result not yet received
        # The stream has answered once: plans go straight onto it. Until then only the first plan
        # is written; the rest of ``_unanswered`` is written when that first result comes.
        self._served = False

    @property
    def in_flight(self) -> int:
        return len(self._unanswered)

    async def send(self, plan: worker_pb2.BatchPlan) -> None:
        self._unanswered.append(plan)
        if not self.streaming:
            return  # run by ``receive``, one call at a time, in order
        if self._call is None:
            self._call = self.stub.ExecuteStream()
        elif not self._served:
            return  # held in _unanswered until the stream answers
        await self._write(plan)

    async def _write(self, plan: worker_pb2.BatchPlan) -> None:
        assert self._call is not None
        try:
            await self._call.write(plan)
        except grpc.aio.AioRpcError:
            pass  # the stream has ended: ``receive`` reads its status
        except asyncio.InvalidStateError:
            pass  # already done (e.g. the worker aborted it): same

    async def receive(self) -> worker_pb2.IterationResult:
        """The result of the oldest plan sent. Raises ``grpc.aio.AioRpcError`` with the worker's
        status, or ``LinkTimeout`` after ``timeout_s`` without one."""
        if not self._unanswered:
            raise RuntimeError("receive() with no plan in flight")
        if self.streaming:
            assert self._call is not None
            try:
                reply = await asyncio.wait_for(self._call.read(), self.timeout_s)
            except asyncio.TimeoutError:
                raise LinkTimeout(f"no result within {self.timeout_s:g} s") from None
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                log.info("worker_without_stream", worker=self.worker_id,
                         detail="falling back to one ExecuteIteration per plan, unpipelined")
                self.streaming = False
                self._call = None  # every plan still in _unanswered is resent, one call each
                return await self.receive()
            if reply is grpc.aio.EOF:
                raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                           details="the worker ended the plan stream")
            self._unanswered.popleft()
            if not self._served:
                self._served = True
                for held in list(self._unanswered):
                    await self._write(held)
            return reply
        plan = self._unanswered[0]
        try:
            reply = await self.stub.ExecuteIteration(plan, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise LinkTimeout(f"no result within {self.timeout_s:g} s") from None
            raise
        self._unanswered.popleft()
        return reply

    def close(self) -> None:
        """End the stream (plans in flight are abandoned; the worker finishes the running one)."""
        if self._call is not None:
            self._call.cancel()
            self._call = None
        self._unanswered.clear()
