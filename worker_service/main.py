"""Starting and stopping a worker process.

``start_worker`` wires the parts (executor, Worker server, scheduler channel, registration)
and returns a handle; tests call it in-process with port 0 and a fake scheduler. ``run`` adds
the signals. Stop order, as in every AccelGen server: health NOT_SERVING, then
``server.stop(grace)`` so the in-flight iteration finishes, then deregister and release the
executor.

SIGTERM (systemd's stop) *drains* first (``WorkerHandle.drain``): the scheduler routes this worker
no new request (DrainWorker) while the ones it has run to the end, plans still executed as they
come; once the scheduler reports none left, or after ``drain_grace_s`` (the scheduler then hands
the rest to other workers, recomputed there), the worker deregisters and stops as above, exit 0.
An operator's ``accelgen drain`` starts the same drain from the scheduler (the heartbeat answers
say so). SIGINT, a second signal during a drain, or ``drain_grace_s = 0`` stop at once: the
requests still here are recomputed elsewhere. A scheduler without DrainWorker: stop at once.

Health: liveness (``"liveness"``) is SERVING while the process runs; readiness (``""`` and
``accelgen.v1.Worker``) only while a scheduler knows this worker (registered, heartbeats
answered). Exit status: 0 after SIGTERM/SIGINT, 2 for a configuration error (bad settings, an
executor that cannot be built from them, a port another process holds), 4 when the device failed
``max_device_failures`` times in a row (NOT_SERVING, deregister best-effort, exit: systemd
restarts it or an operator replaces the device).

    python -m worker_service.main --scheduler 127.0.0.1:50051 --executor sim
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import Sequence

import grpc
import structlog
from grpc_health.v1 import health as grpc_health

from accelgen.common.grpc_server import (CHANNEL_OPTIONS, CannotListen, FailoverChannel, serve_until_stopped,
                                         set_alive, set_serving)
from accelgen.common.logs import setup_logging
from accelgen.common.metrics_http import MetricsServer
from accelgen.common.tls import read_certificates
from accelgen.v1 import scheduler_pb2_grpc
from worker_service.config import LOADER, WorkerConfig
from worker_service.executors.base import Executor
from worker_service.executors.registry import executor_from_config
from worker_service.metrics import start_worker_metrics
from worker_service.registration import Registration
from worker_service.server import WORKER_SERVICE_NAME, WorkerServicer, build_server

log = structlog.get_logger(service="worker")

EXIT_CONFIG = 2
EXIT_DEVICE_FAILED = 4
CLOSE_AFTER_DEVICE_FAILURE_S = 10.0  # a failed device may hang on release: give up waiting then


@dataclass
class WorkerHandle:
    """A running worker. ``stop()`` is the SIGTERM path; ``wait()`` returns once it has stopped."""

    config: WorkerConfig
    port: int
    address: str  # what the scheduler was told to dial
    server: grpc.aio.Server
    health: grpc_health.aio.HealthServicer
    servicer: WorkerServicer
    registration: Registration
    channel: FailoverChannel  # to the scheduler (a leader among standbys)
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    exit_code: int = 0  # what the process exits with once stopped (EXIT_DEVICE_FAILED, or 0)
    metrics_server: MetricsServer | None = None  # Prometheus /metrics (metrics_port), worker_service/metrics.py
    drain_task: asyncio.Task[None] | None = None  # the drain under way, if any
    _remote_drain: asyncio.Task[None] | None = None  # waits for a drain the scheduler started

    @property
    def executor(self) -> Executor:
        return self.servicer.executor

    async def stop(self) -> None:
        self.stop_event.set()
        await self.wait()

    async def wait(self) -> None:
        if self.task is not None:
            await self.task

    def signal_received(self, sig: int) -> None:
        """SIGTERM: drain (unless ``drain_grace_s`` is 0). SIGINT, or any signal during a drain: stop now."""
        if sig == signal.SIGTERM and self.config.drain_grace_s > 0 and self.drain_task is None \
                and not self.stop_event.is_set():
            self.drain_task = asyncio.create_task(self.drain(), name="drain")
            return
        if self.drain_task is not None and not self.drain_task.done():
            log.warning("drain_interrupted", worker=self.config.worker_id, assigned=self.registration.assigned)
        self.stop_event.set()

    async def drain(self, ask: bool = True) -> None:
        """Take this worker out of service (module doc), then stop. ``ask``: this worker asks the
        scheduler (SIGTERM); else the scheduler started the drain (``accelgen drain``)."""
        reg = self.registration
        await set_serving(self.health, [WORKER_SERVICE_NAME], False)  # takes no new work
        if ask and not await reg.request_drain(self.config.drain_grace_s):
            log.warning("drain_not_possible", worker=self.config.worker_id, action="stopping at once")
            self.stop_event.set()
            return
        # The scheduler ends the drain at its deadline (it forgets us: ``drained``); past that and
        # a heartbeat TTL without an answer, leave anyway.
        margin_s = (reg.heartbeat_ttl_s or 2 * reg.heartbeat_interval_s) + reg.rpc_timeout_s
        try:
            await asyncio.wait_for(reg.drained.wait(), timeout=reg.drain_left_s + margin_s)
        except asyncio.TimeoutError:
            log.warning("drain_timed_out", worker=self.config.worker_id, assigned=reg.assigned)
        log.info("drained", worker=self.config.worker_id, assigned=reg.assigned)
        await reg.stop(deregister=True)  # the scheduler re-routes whatever is still here
        self.stop_event.set()

    async def _follow_remote_drain(self) -> None:
        await self.registration.draining.wait()
        if self.drain_task is None and not self.stop_event.is_set():
            self.drain_task = asyncio.create_task(self.drain(ask=False), name="drain")

    async def _on_stop(self) -> None:
        for task in (self._remote_drain, self.drain_task):
            if task is not None and not task.done() and task is not asyncio.current_task():
                task.cancel()
        await self.registration.stop(deregister=True)
        await self.channel.close()
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        if self.exit_code == EXIT_DEVICE_FAILED:
            await self._close_failed_device()
        else:
            await asyncio.to_thread(self.servicer.close)
        log.info("worker_stopped", worker=self.config.worker_id, exit_code=self.exit_code)

    def _device_failed(self) -> None:
        """The runner declared the device failed: stop (NOT_SERVING, deregister) and exit 4."""
        if self.exit_code != EXIT_DEVICE_FAILED:
            log.error("worker_exiting", worker=self.config.worker_id, reason="device_failed",
                      exit_code=EXIT_DEVICE_FAILED)
        self.exit_code = EXIT_DEVICE_FAILED
        self.stop_event.set()

    async def _on_registration(self, registered: bool) -> None:
        """Readiness follows registration; once draining or stopping, it stays NOT_SERVING."""
        ready = registered and not self.stop_event.is_set() and not self.registration.draining.is_set()
        await set_serving(self.health, [WORKER_SERVICE_NAME], ready)

    async def _close_failed_device(self) -> None:
        """Release the executor on a daemon thread, bounded: a broken device's driver may hang,
        and the process must exit anyway."""
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def close() -> None:
            try:
                self.servicer.close()
            except Exception:
                log.exception("executor_close_failed", worker=self.config.worker_id)
            finally:
                loop.call_soon_threadsafe(done.set)

        threading.Thread(target=close, name="close-failed-device", daemon=True).start()
        try:
            await asyncio.wait_for(done.wait(), CLOSE_AFTER_DEVICE_FAILURE_S)
        except asyncio.TimeoutError:
            log.warning("executor_close_timed_out", worker=self.config.worker_id, after_s=CLOSE_AFTER_DEVICE_FAILURE_S)


def scheduler_channel_options(config: WorkerConfig) -> list[tuple[str, int]]:
    """The shared options, with gRPC's reconnect backoff capped like our registration backoff:
    its default grows to 120 s, so a worker would sit out a restarted scheduler for minutes."""
    cap_ms = int(config.register_backoff_max_s * 1000)
    return CHANNEL_OPTIONS + [
        ("grpc.initial_reconnect_backoff_ms", min(100, cap_ms)),
        ("grpc.min_reconnect_backoff_ms", min(100, cap_ms)),
        ("grpc.max_reconnect_backoff_ms", cap_ms),
    ]


async def start_worker(config: WorkerConfig, executor: Executor | None = None) -> WorkerHandle:
    """Bind and start the Worker service, then start registering with the scheduler.

    ``executor`` defaults to ``config.executor`` built from the config. The server accepts calls
    before the first RegisterWorker, so a scheduler may call Describe or send a plan at once; it
    reports ready (health SERVING) once registered.
    """
    executor = executor if executor is not None else await asyncio.to_thread(executor_from_config, config)
    server, health_servicer, servicer, port = build_server(executor, config.host, config.listen_port,
                                                           config.max_device_failures, config.transport)
    metrics_server = await start_worker_metrics(servicer.metrics, config.host, config.metrics_port, config.port_offset)
    await server.start()
    await set_alive(health_servicer, True)
    await set_serving(health_servicer, [WORKER_SERVICE_NAME], False)  # ready once registered
    address = config.advertised_address(port)
    channel = FailoverChannel(config.scheduler, scheduler_channel_options(config), transport=config.transport,
                              peer_role="scheduler")
    registration = Registration(
        scheduler_pb2_grpc.SchedulerStub(channel.channel), config.worker_id, address, servicer.description,
        rpc_timeout_s=config.rpc_timeout_s, backoff_max_s=config.register_backoff_max_s, failover=channel,
    )
    handle = WorkerHandle(config, port, address, server, health_servicer, servicer, registration, channel)
    registration.on_change = handle._on_registration
    handle.metrics_server = metrics_server
    servicer.metrics.follow(config.worker_id, registration)
    servicer.on_device_failed = handle._device_failed
    servicer.stopping = handle.stop_event
    handle.task = asyncio.create_task(serve_until_stopped(
        server, health_servicer, [WORKER_SERVICE_NAME], handle.stop_event, config.grace_s, handle._on_stop,
        mark_ready=False,
    ))
    registration.start()
    handle._remote_drain = asyncio.create_task(handle._follow_remote_drain(), name="follow-drain")
    info = servicer.info
    log.info("worker_started", worker=config.worker_id, address=address, bound=f"{config.host}:{port}",
             tls=config.transport.secure,
             scheduler=config.scheduler, executor=info.executor, model=info.model, num_blocks=info.num_blocks,
             block_size=info.block_size, metrics=metrics_server.url if metrics_server else None)
    return handle


async def run(config: WorkerConfig) -> int:
    """Serve until SIGTERM (after a drain), SIGINT or a failed device, then stop in order (see
    module doc); returns the exit status."""
    try:
        handle = await start_worker(config)
    except (ValueError, CannotListen) as exc:  # an executor/model/profile that cannot be built; a taken port
        log.error("worker_could_not_start", error=str(exc), exit_code=EXIT_CONFIG)
        return EXIT_CONFIG
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, handle.signal_received, sig)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            pass
    await handle.wait()
    return handle.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    config = LOADER.main_config(argv, prog="accelgen worker",
                                description="AccelGen worker: runs the scheduler's batch plans")
    read_certificates(LOADER, config)
    setup_logging("worker", config.log_level)
    code = asyncio.run(run(config))
    if code == EXIT_DEVICE_FAILED:
        # Skip the interpreter's join of executor threads: a failed device may have left one stuck.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
