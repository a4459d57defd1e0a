"""Run the scheduler service: ``python -m scheduler_service.main`` or ``accelgen scheduler``."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Sequence

from accelgen.common.grpc_server import install_sigterm, make_server, serve_until_stopped, set_serving
from accelgen.common.logs import setup_logging
from accelgen.v1 import scheduler_pb2, scheduler_pb2_grpc
from scheduler_service.app import SchedulerApp
from scheduler_service.config import LOADER, SchedulerConfig
from scheduler_service.server import SchedulerServicer
from scheduler_service.state.store import RedisStore

SERVICE = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name


@dataclass
class SchedulerHandle:
    app: SchedulerApp
    server: object
    port: int
    health: object

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace_s: float = 1.0) -> None:
        await set_serving(self.health, [SERVICE], False)
        await self.server.stop(grace_s)
        await self.app.stop()
        await self.app.store.close()


async def start_scheduler(config: SchedulerConfig) -> SchedulerHandle:
    """Bind, take the lease, recover from Redis, and serve. Tests bind port 0."""
    store = RedisStore(config.redis_url, config.redis_prefix, config.finished_ttl_s)
    app = SchedulerApp(config, store)
    server, health = make_server([SERVICE])
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(SchedulerServicer(app), server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    await app.start()
    await server.start()
    await set_serving(health, [SERVICE], True)
    return SchedulerHandle(app, server, port, health)


async def run(config: SchedulerConfig) -> None:
    log = setup_logging("scheduler", config.log_level)
    handle = await start_scheduler(config)
    log.info("scheduler_serving", port=handle.port, policy=config.policy, redis=config.redis_url)
    stop = asyncio.Event()
    install_sigterm(stop)
    await serve_until_stopped(handle.server, handle.health, [SERVICE], stop, config.grace_s,
                              on_stop=lambda: _shutdown(handle))


async def _shutdown(handle: SchedulerHandle) -> None:
    await handle.app.stop()
    await handle.app.store.close()


def main(argv: Sequence[str] | None = None) -> int:
    config = LOADER.main_config(argv, prog="accelgen scheduler", description="AccelGen scheduler service")
    asyncio.run(run(config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
