"""The Worker gRPC service: a thin shell over an executor.

Each ``ExecuteIteration`` decodes the plan (``convert``), runs it on the executor thread and
encodes the result. Errors become status codes here and only here: a plan that is malformed
or contradicts the worker's state is ``INVALID_ARGUMENT`` with the executor's message; an
executor crash is ``INTERNAL``.

The executor runs on one dedicated thread. That serialises iterations (one plan at a time,
in arrival order) even when a caller's deadline expires and its handler is cancelled while
the model is still running — an ``asyncio.Lock`` released on cancellation would let the next
plan start beside it. One thread is also what CUDA-bound model runners expect.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc
import structlog
from grpc_health.v1 import health

from accelgen.common.grpc_server import make_server
from accelgen.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from accelgen.wire.worker_info import worker_info_to_proto
from worker_service.convert import plan_from_proto, result_to_proto
from worker_service.executors.base import Executor
from worker_service.plan import ExecResult, WorkerPlan

log = structlog.get_logger(service="worker")

WORKER_SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name


class PlanRunner:
    """Executor plus the scheduler's epoch. Runs on the executor thread, so the epoch check
    and the iteration are one step that no other plan can interleave with."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self.epoch: str | None = None

    def run(self, plan: WorkerPlan) -> ExecResult:
        if plan.epoch != self.epoch:
            # A new scheduler incarnation rebuilt its state from Redis; what this worker holds
            # about requests belongs to the old one. Drop it: the new one sends is_new chunks.
            # This happens even if the plan is then rejected (ValueError below): once a newer
            # scheduler has spoken, the old one's state is obsolete whatever the new one sent.
            if self.epoch is not None:
                log.info("epoch_changed", old=self.epoch, new=plan.epoch, iteration=plan.iteration)
            self.executor.reset()
            self.epoch = plan.epoch
        return self.executor.execute(plan)


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self.runner = PlanRunner(executor)
        self.info = executor.describe()
        self.description = worker_info_to_proto(self.info)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="executor")

    async def ExecuteIteration(self, request: worker_pb2.BatchPlan, context: grpc.aio.ServicerContext) -> worker_pb2.IterationResult:
        try:
            plan = plan_from_proto(request, default_max_tokens=self.info.max_model_len)
            result = await asyncio.get_running_loop().run_in_executor(self._thread, self.runner.run, plan)
        except ValueError as exc:
            log.warning("plan_rejected", iteration=request.iteration, epoch=request.epoch, error=str(exc))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"iteration {request.iteration}: {exc}")
        except Exception as exc:  # the executor crashed: the scheduler treats the worker as failed
            log.exception("executor_failed", iteration=request.iteration)
            await context.abort(grpc.StatusCode.INTERNAL, f"executor failed on iteration {request.iteration}: {exc!r}")
        log.debug("iteration_done", iteration=plan.iteration, chunks=len(plan.chunks), tokens=plan.num_tokens,
                  elapsed_s=round(result.elapsed_s, 6), predicted_s=round(plan.predicted_time_s, 6))
        return result_to_proto(result)

    async def Describe(self, request: worker_pb2.DescribeRequest, context: grpc.aio.ServicerContext) -> common_pb2.WorkerDescription:
        return self.description

    def close(self) -> None:
        """Wait for the running iteration, then release the executor (after the server stopped)."""
        self._thread.shutdown(wait=True, cancel_futures=True)
        self.executor.close()


def build_server(executor: Executor, host: str, port: int) -> tuple[grpc.aio.Server, health.aio.HealthServicer, WorkerServicer, int]:
    """A Worker server bound to ``host:port`` (0 = a free port chosen by the OS), not started.

    Returns the bound port. Health and reflection are registered; the caller marks the health
    status (``accelgen.common.grpc_server.set_serving``) once it is ready.
    """
    server, health_servicer = make_server([WORKER_SERVICE_NAME])
    servicer = WorkerServicer(executor)
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind the Worker service to {host}:{port}")
    return server, health_servicer, servicer, bound
