"""What every AccelGen gRPC server shares: health checking, reflection, graceful SIGTERM.

On SIGTERM a server first reports NOT_SERVING (load balancers stop sending), then stops with
a grace period so in-flight calls finish, then runs its own clean-up (deregister, hand back
work) — the order vLLM's gRPC server uses.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from typing import Awaitable, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

# Keep connections alive through idle periods and detect dead peers in seconds, not minutes.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_server(service_names: Iterable[str]) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """An aio server with health and reflection registered for ``service_names``."""
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    reflection.enable_server_reflection(names + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                                 reflection.SERVICE_NAME], server)
    return server, health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, names: Iterable[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in list(names) + [""]:
        await health_servicer.set(name, status)


def install_sigterm(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            pass


async def serve_until_stopped(
    server: grpc.aio.Server,
    health_servicer: health.aio.HealthServicer,
    names: Iterable[str],
    stop: asyncio.Event,
    grace_s: float = 5.0,
    on_stop: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Serve until ``stop`` is set: NOT_SERVING, then stop(grace), then ``on_stop``."""
    names = list(names)
    await set_serving(health_servicer, names, True)
    await stop.wait()
    await set_serving(health_servicer, names, False)
    await server.stop(grace_s)
    if on_stop is not None:
        await on_stop()
