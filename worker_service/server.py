"""The Worker gRPC service: a thin shell over an executor.

Each plan, from ``ExecuteStream`` (a scheduler lane's long-lived stream, plans and results in
order, pipelined) or ``ExecuteIteration`` (one round trip per plan), is decoded (``convert``),
run on the executor thread and its result encoded. Errors become status codes here and only here: a plan that is malformed
or contradicts the worker's state is ``INVALID_ARGUMENT`` with the executor's message; a plan
from a deposed scheduler (its fence is below the highest this worker has seen) is
``FAILED_PRECONDITION`` and touches nothing; an executor crash is ``INTERNAL``. After
``max_device_failures`` crashes in a row the device is declared failed: later plans are
``UNAVAILABLE`` and the process exits (``worker_service.main``, exit status 4) so that systemd
restarts it or an operator replaces it, rather than a broken worker re-registering for ever.

The executor runs on one dedicated thread. That serialises iterations (one plan at a time,
in arrival order) even when a caller's deadline expires and its handler is cancelled while
the model is still running — an ``asyncio.Lock`` released on cancellation would let the next
plan start beside it. One thread is also what CUDA-bound model runners expect.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable

import grpc
import structlog
from grpc_health.v1 import health

from accelgen.common.authz import method_rules
from accelgen.common.grpc_server import listen, make_server
from accelgen.common.tls import Transport
from accelgen.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from accelgen.wire.worker_info import worker_info_to_proto
from worker_service.convert import plan_from_proto, result_to_proto
from worker_service.executors.base import Executor
from worker_service.metrics import WorkerMetrics
from worker_service.plan import ExecResult, WorkerPlan

log = structlog.get_logger(service="worker")

WORKER_SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name
# With mutual TLS, plans and descriptions are for the scheduler's certificate only.
ROLES = method_rules(WORKER_SERVICE_NAME, {"ExecuteIteration": "scheduler", "ExecuteStream": "scheduler",
                                           "Describe": "scheduler"})


MAX_PLANS_AHEAD = 4  # plans one stream may queue on the executor thread (a scheduler sends <= 2)


class _StreamRun:
    """One ExecuteStream call: whether a plan of it failed (later ones are then skipped)."""

    __slots__ = ("failed",)

    def __init__(self) -> None:
        self.failed = False


class _Skipped(Exception):
    """A plan queued behind a failed one on the same stream."""


def _outcome_seen(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


class StalePlan(Exception):
    """A plan from a deposed scheduler: its fence is below the highest this worker has seen."""


class DeviceFailed(Exception):
    """The device failed ``max_device_failures`` times in a row; this worker is exiting."""


class PlanRunner:
    """Executor plus the scheduler's epoch and fence, and the count of device failures. Runs on
    the executor thread, so the checks and the iteration are one step that no other plan can
    interleave with.

    ``max_device_failures`` consecutive executor crashes (anything but ``ValueError``, which is
    a bad plan, not a bad device) call ``on_device_failed`` once, on this thread; 0 = never.
    A successful iteration resets the count.
    """

    def __init__(self, executor: Executor, max_device_failures: int = 3,
                 on_device_failed: Callable[[], None] | None = None) -> None:
        self.executor = executor
        self.epoch: str | None = None
        self.fence = 0  # the highest fence seen; 0 = no fenced plan yet
        self.max_device_failures = max_device_failures
        self.on_device_failed = on_device_failed
        self.consecutive_failures = 0
        self.device_failed = False

    def run(self, plan: WorkerPlan) -> ExecResult:
        if self.device_failed:
            raise DeviceFailed(f"the device failed {self.consecutive_failures} times in a row; this worker is exiting")
        self._check_fence(plan)
        try:
            if plan.epoch != self.epoch:
                # A new scheduler incarnation rebuilt its state from Redis; what this worker holds
                # about requests belongs to the old one. Drop it: the new one sends is_new chunks.
                # This happens even if the plan is then rejected (ValueError below): once a newer
                # scheduler has spoken, the old one's state is obsolete whatever the new one sent.
                if self.epoch is not None:
                    log.info("epoch_changed", old=self.epoch, new=plan.epoch, iteration=plan.iteration)
                self.executor.reset()
                self.epoch = plan.epoch
            result = self.executor.execute(plan)
        except ValueError:
            raise  # the plan contradicts this worker's state: the scheduler's fault, not the device's
        except Exception:
            self._count_failure(plan)
            raise
        self.consecutive_failures = 0
        return result

    def _check_fence(self, plan: WorkerPlan) -> None:
        """Refuse a deposed leader's plan before it touches anything; adopt a higher fence (the
        new leader's plans carry a new epoch too, on which the executor resets)."""
        if not plan.fence:
            return  # unfenced: the simulator, tests
        if plan.fence < self.fence:
            raise StalePlan(f"plan from a deposed scheduler: fence {plan.fence} < {self.fence}")
        if plan.fence > self.fence:
            if self.fence:
                log.info("fence_adopted", old=self.fence, new=plan.fence, epoch=plan.epoch)
            self.fence = plan.fence

    def _count_failure(self, plan: WorkerPlan) -> None:
        self.consecutive_failures += 1
        if self.max_device_failures and self.consecutive_failures >= self.max_device_failures:
            self.device_failed = True
            log.error("device_failed", failures=self.consecutive_failures, iteration=plan.iteration)
            if self.on_device_failed is not None:
                self.on_device_failed()


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, executor: Executor, max_device_failures: int = 3) -> None:
        self.executor = executor
        self.runner = PlanRunner(executor, max_device_failures, self._device_failed_on_thread)
        self.info = executor.describe()
        self.description = worker_info_to_proto(self.info)
        self.metrics = WorkerMetrics("", self.info)  # worker_service.main names it and serves it
        self.metrics.consecutive_failures = lambda: self.runner.consecutive_failures
        self.metrics.device_failed = lambda: self.runner.device_failed
        self.on_device_failed: Callable[[], None] | None = None  # called on the event loop, once
        # Set when the worker begins to stop: plan streams take no more plans, finish the ones
        # they hold and end UNAVAILABLE (else a stream would hold the server's grace period open).
        self.stopping: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="executor",
                                          initializer=executor.prepare_thread)

    async def ExecuteIteration(self, request: worker_pb2.BatchPlan, context: grpc.aio.ServicerContext) -> worker_pb2.IterationResult:
        self._loop = asyncio.get_running_loop()
        try:
            plan = plan_from_proto(request, default_max_tokens=self.info.max_model_len)
            result = await self._loop.run_in_executor(self._thread, self.runner.run, plan)
        except Exception as exc:
            await context.abort(*self.metrics.failed(self._status(request.iteration, request.epoch, exc)))
        self._log_done(plan, result)
        self.metrics.done(plan, result)
        return result_to_proto(result, time.time())

    async def ExecuteStream(self, request_iterator: AsyncIterator[worker_pb2.BatchPlan],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[worker_pb2.IterationResult]:
        """Plans in arrival order, each handed to the executor thread as soon as it is decoded,
        so plan k+1 starts the moment k ends, without waiting for the event loop or the
        scheduler (the thread runs its queue in order). At most ``MAX_PLANS_AHEAD`` are queued.
        The first failure ends the stream; plans queued behind it are not run. Once the worker is
        stopping, the plans already taken finish and the stream ends UNAVAILABLE."""
        loop = self._loop = asyncio.get_running_loop()
        run = _StreamRun()
        ahead = asyncio.Semaphore(MAX_PLANS_AHEAD)
        queue: asyncio.Queue[tuple[worker_pb2.BatchPlan, WorkerPlan | None, asyncio.Future] | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for msg in request_iterator:
                    await ahead.acquire()
                    try:
                        plan = plan_from_proto(msg, default_max_tokens=self.info.max_model_len)
                    except ValueError as exc:
                        failed = loop.create_future()
                        failed.set_exception(exc)
                        queue.put_nowait((msg, None, failed))
                        return
                    queue.put_nowait((msg, plan, loop.run_in_executor(self._thread, self._run_in_stream, run, plan)))
            finally:
                queue.put_nowait(None)

        reader = asyncio.create_task(read(), name="worker-stream-reader")
        stop_watch = asyncio.create_task(self.stopping.wait()) if self.stopping is not None else None
        if stop_watch is not None:
            stop_watch.add_done_callback(lambda _: reader.cancel())
        try:
            while (item := await queue.get()) is not None:
                msg, plan, future = item
                try:
                    result = await future
                except Exception as exc:
                    run.failed = True
                    await context.abort(*self.metrics.failed(self._status(msg.iteration, msg.epoch, exc)))
                self._log_done(plan, result)
                self.metrics.done(plan, result)
                yield result_to_proto(result, time.time())
                ahead.release()
            if self.stopping is not None and self.stopping.is_set():
                await context.abort(grpc.StatusCode.UNAVAILABLE, "this worker is stopping: it takes no more plans")
            await reader  # the scheduler closed its side: a read error, if any, surfaces here
        finally:
            run.failed = True  # queued plans of an ended stream must not run
            reader.cancel()
            if stop_watch is not None:
                stop_watch.cancel()
            while not queue.empty():  # their outcomes (skipped) are nobody's news
                if (item := queue.get_nowait()) is not None:
                    item[2].add_done_callback(_outcome_seen)

    def _run_in_stream(self, run: "_StreamRun", plan: WorkerPlan) -> ExecResult:
        """On the executor thread: one plan of a stream, unless an earlier one of it failed."""
        if run.failed:
            raise _Skipped(f"iteration {plan.iteration}: not run, an earlier plan of this stream failed")
        try:
            return self.runner.run(plan)
        except BaseException:
            run.failed = True
            raise

    def _status(self, iteration: int, epoch: str, exc: Exception) -> tuple[grpc.StatusCode, str]:
        """The one mapping of a failed plan to its status (both RPCs)."""
        if isinstance(exc, ValueError):
            log.warning("plan_rejected", iteration=iteration, epoch=epoch, error=str(exc))
            return grpc.StatusCode.INVALID_ARGUMENT, f"iteration {iteration}: {exc}"
        if isinstance(exc, StalePlan):
            log.warning("plan_refused", iteration=iteration, epoch=epoch, error=str(exc))
            return grpc.StatusCode.FAILED_PRECONDITION, f"iteration {iteration}: {exc}"
        if isinstance(exc, DeviceFailed):
            return grpc.StatusCode.UNAVAILABLE, f"iteration {iteration}: {exc}"
        if isinstance(exc, _Skipped):
            return grpc.StatusCode.ABORTED, str(exc)
        # the executor crashed: the scheduler treats the worker as failed
        log.error("executor_failed", iteration=iteration, consecutive_failures=self.runner.consecutive_failures,
                  exc_info=exc)
        return grpc.StatusCode.INTERNAL, f"executor failed on iteration {iteration}: {exc!r}"

    @staticmethod
    def _log_done(plan: WorkerPlan, result: ExecResult) -> None:
        log.debug("iteration_done", iteration=plan.iteration, chunks=len(plan.chunks), tokens=plan.num_tokens,
                  elapsed_s=round(result.elapsed_s, 6), predicted_s=round(plan.predicted_time_s, 6))

    def _device_failed_on_thread(self) -> None:
        """Hand the news to the event loop (the runner calls this on the executor thread, even
        when the plan's caller has already given up)."""
        if self._loop is not None and self.on_device_failed is not None:
            self._loop.call_soon_threadsafe(self.on_device_failed)

    async def Describe(self, request: worker_pb2.DescribeRequest, context: grpc.aio.ServicerContext) -> common_pb2.WorkerDescription:
        return self.description

    def close(self) -> None:
        """Wait for the running iteration, then release the executor (after the server stopped)."""
        self._thread.shutdown(wait=True, cancel_futures=True)
        self.executor.close()


def build_server(executor: Executor, host: str, port: int, max_device_failures: int = 3,
                 transport: Transport | None = None,
                 ) -> tuple[grpc.aio.Server, health.aio.HealthServicer, WorkerServicer, int]:
    """A Worker server bound to ``host:port`` (0 = a free port chosen by the OS), not started.

    Returns the bound port; ``CannotListen`` if the port is taken. Health and reflection are
    registered; the caller marks the health status (``accelgen.common.grpc_server.set_serving``)
    once it is ready. With a secure ``transport`` only the scheduler's certificate may send plans
    (``ROLES``).
    """
    server, health_servicer = make_server([WORKER_SERVICE_NAME], transport, ROLES)
    servicer = WorkerServicer(executor, max_device_failures)
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    bound = listen(server, host, port, transport.server_credentials() if transport is not None else None)
    return server, health_servicer, servicer, bound
