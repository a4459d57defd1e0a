"""Starting and stopping a worker process.

``start_worker`` wires the parts (executor, Worker server, scheduler channel, registration)
and returns a handle; tests call it in-process with port 0 and a fake scheduler. ``run`` adds
SIGTERM handling. Stop order, as in every AccelGen server: health NOT_SERVING, then
``server.stop(grace)`` so the in-flight iteration finishes, then deregister and release the
executor.

    python -m worker_service.main --scheduler 127.0.0.1:50051 --executor sim
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Sequence

import grpc
import structlog
from grpc_health.v1 import health as grpc_health

from accelgen.common.grpc_server import CHANNEL_OPTIONS, install_sigterm, serve_until_stopped, set_serving
from accelgen.common.logs import setup_logging
from accelgen.v1 import scheduler_pb2_grpc
from worker_service.config import LOADER, WorkerConfig
from worker_service.executors.base import Executor
from worker_service.executors.registry import executor_from_config
from worker_service.registration import Registration
from worker_service.server import WORKER_SERVICE_NAME, WorkerServicer, build_server

log = structlog.get_logger(service="worker")


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
    channel: grpc.aio.Channel
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def executor(self) -> Executor:
        return self.servicer.executor

    async def stop(self) -> None:
        self.stop_event.set()
        await self.wait()

    async def wait(self) -> None:
        if self.task is not None:
            await self.task

    async def _on_stop(self) -> None:
        await self.registration.stop(deregister=True)
        await self.channel.close()
        await asyncio.to_thread(self.servicer.close)
        log.info("worker_stopped", worker=self.config.worker_id)


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

    ``executor`` defaults to ``config.executor`` built from the config. The server is SERVING
    before the first RegisterWorker, so a scheduler may call Describe or send a plan at once.
    """
    executor = executor if executor is not None else await asyncio.to_thread(executor_from_config, config)
    server, health_servicer, servicer, port = build_server(executor, config.host, config.port)
    await server.start()
    await set_serving(health_servicer, [WORKER_SERVICE_NAME], True)
    address = config.advertised_address(port)
    channel = grpc.aio.insecure_channel(config.scheduler, options=scheduler_channel_options(config))
    registration = Registration(
        scheduler_pb2_grpc.SchedulerStub(channel), config.worker_id, address, servicer.description,
        rpc_timeout_s=config.rpc_timeout_s, backoff_max_s=config.register_backoff_max_s,
    )
    handle = WorkerHandle(config, port, address, server, health_servicer, servicer, registration, channel)
    handle.task = asyncio.create_task(serve_until_stopped(
        server, health_servicer, [WORKER_SERVICE_NAME], handle.stop_event, config.grace_s, handle._on_stop,
    ))
    registration.start()
    info = servicer.info
    log.info("worker_started", worker=config.worker_id, address=address, bound=f"{config.host}:{port}",
             scheduler=config.scheduler, executor=info.executor, model=info.model, num_blocks=info.num_blocks,
             block_size=info.block_size)
    return handle


async def run(config: WorkerConfig) -> None:
    """Serve until SIGTERM/SIGINT, then stop in order (see module doc)."""
    handle = await start_worker(config)
    install_sigterm(handle.stop_event)
    await handle.wait()


def main(argv: Sequence[str] | None = None) -> int:
    config = LOADER.main_config(argv, prog="accelgen worker",
                                description="AccelGen worker: runs the scheduler's batch plans")
    setup_logging("worker", config.log_level)
    asyncio.run(run(config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
