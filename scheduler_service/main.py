"""Run the scheduler service: ``python -m scheduler_service.main`` or ``accelgen scheduler``.

A scheduler starts as a standby: it waits for the leader lease in Redis (``lease_wait_s``, 0 = for
ever) and only then recovers, binds and listens — so clients given every scheduler's address
(``channel_target``'s pick_first list) connect to the leader, the only one listening.

Exit status: 0 after SIGTERM/SIGINT, 2 when it could not start (the lease not free within
``lease_wait_s``, the port taken, Redis refusing our credentials), 3 when it lost the leader lease
(deposed: its supervisor restarts it, as a standby).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Sequence

from accelgen.common.authz import method_rules
from accelgen.common.grpc_server import install_sigterm, listen, make_server, set_alive, set_serving
from accelgen.common.logs import setup_logging
from accelgen.common.metrics_http import MetricsServer, start_metrics_server
from accelgen.common.tls import read_certificates
from accelgen.v1 import scheduler_pb2, scheduler_pb2_grpc
from scheduler_service.app import SchedulerApp
from scheduler_service.config import LOADER, SchedulerConfig
from scheduler_service.server import SchedulerServicer
from scheduler_service.state import redis_conn
from scheduler_service.state.store import LeaseLost, RedisStore

SERVICE = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name

EXIT_OK, EXIT_CANNOT_START, EXIT_LEASE_LOST = 0, 2, 3
# Who may call what, with mutual TLS (accelgen.common.authz): gateways submit and read requests,
# workers register. Every method of the service is named here; one left out is refused to all.
# DrainWorker: a worker drains itself (its own id only, as for DeregisterWorker); the operator's
# tools (`accelgen drain`, like the launcher's probes) call as the gateway role, which may drain any.
ROLES = method_rules(SERVICE, {
    "Submit": "gateway", "WatchMany": "gateway", "Cancel": "gateway", "GetRequest": "gateway",
    "GetServerInfo": "gateway",
    "RegisterWorker": "worker", "Heartbeat": "worker", "DeregisterWorker": "worker",
    "DrainWorker": ("worker", "gateway"),
})
DEPOSED_GRACE_S = 0.5  # a deposed scheduler's in-flight calls get this long, not grace_s


@dataclass
class SchedulerHandle:
    app: SchedulerApp
    server: object
    port: int
    health: object
    metrics: MetricsServer | None = None  # Prometheus /metrics, when metrics_port is set

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def lease_lost(self) -> asyncio.Event:
        """Set once this scheduler is deposed (it has stopped planning and reports NOT_SERVING)."""
        return self.app.lease_lost

    async def stop(self, grace_s: float = 1.0) -> None:
        await set_serving(self.health, [SERVICE], False)
        await set_alive(self.health, False)
        await self.server.stop(DEPOSED_GRACE_S if self.lease_lost.is_set() else grace_s)
        if self.metrics is not None:
            await self.metrics.stop()
        await self.app.stop()
        await self.app.store.close()


async def start_scheduler(config: SchedulerConfig) -> SchedulerHandle:
    """Wait for the lease, recover from Redis, then bind and serve. Tests bind port 0.
    RuntimeError: could not start (nothing held); ``LeaseLost``: deposed while recovering."""
    store = RedisStore(config.redis_url, config.redis_prefix, config.finished_ttl_s, retry_s=config.redis_retry_s,
                       min_replicas=config.redis_min_replicas, replica_timeout_ms=config.redis_replica_timeout_ms)
    app = SchedulerApp(config, store)
    try:
        await app.start()
        await redis_conn.log_durability(store.redis, store.sentinel, store.min_replicas)
        transport = config.transport
        server, health = make_server([SERVICE], transport, ROLES,
                                     options=[("grpc.max_receive_message_length", config.max_message_bytes)])
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(SchedulerServicer(app), server)
        port = listen(server, config.host, config.port, transport.server_credentials())
        metrics = await _serve_metrics(app, config)
        await server.start()
    except BaseException:
        await app.stop()  # hands the lease back if it was taken
        await store.close()
        raise
    await set_alive(health, True)
    await app.attach_health(health, [SERVICE])
    return SchedulerHandle(app, server, port, health, metrics)


async def _serve_metrics(app: SchedulerApp, config: SchedulerConfig) -> MetricsServer | None:
    """The Prometheus endpoint (scheduler_service/metrics.py), once this scheduler leads."""
    if config.metrics_port is None:
        return None
    try:
        return await start_metrics_server(app.metrics.registry, config.host, config.metrics_port)
    except OSError as exc:
        raise RuntimeError(f"cannot serve metrics on {config.host}:{config.metrics_port}: {exc.strerror or exc}; "
                           "set metrics_port to a free port") from None


async def run(config: SchedulerConfig) -> int:
    """Serve until SIGTERM (0) or until deposed (3); 2 if it could not start."""
    log = setup_logging("scheduler", config.log_level)
    stop = asyncio.Event()
    install_sigterm(stop)
    starting = asyncio.create_task(start_scheduler(config))
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # SIGTERM while a standby: nothing held, nothing to hand back
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        return EXIT_OK
    try:
        handle = starting.result()
    except LeaseLost as exc:
        log.error("scheduler_deposed_while_starting", error=str(exc))
        return EXIT_LEASE_LOST
    except RuntimeError as exc:
        log.error("scheduler_cannot_start", error=str(exc))
        return EXIT_CANNOT_START
    log.info("scheduler_serving", port=handle.port, metrics=handle.metrics.url if handle.metrics else None,
             policy=config.policy, redis=redis_conn.redact_url(config.redis_url),
             fence=handle.app.store.fence, tls=config.transport.secure)
    lost = asyncio.create_task(handle.lease_lost.wait())
    await asyncio.wait({stopped, lost}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    lost.cancel()
    deposed = handle.lease_lost.is_set()
    await handle.stop(config.grace_s)
    if deposed:
        log.error("scheduler_exiting_deposed", reason=handle.app.lost_reason, exit_status=EXIT_LEASE_LOST)
        return EXIT_LEASE_LOST
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    config = LOADER.main_config(argv, prog="accelgen scheduler", description="AccelGen scheduler service")
    read_certificates(LOADER, config)
    return asyncio.run(run(config))


if __name__ == "__main__":
    raise SystemExit(main())
