"""What every AccelGen gRPC server shares: health checking, reflection, keepalive, graceful SIGTERM,
binding (``listen``: TLS or plaintext; a taken port fails, SO_REUSEPORT being off) and, with
mutual TLS, the per-method role check (``accelgen.common.authz``).

On SIGTERM a server first reports NOT_SERVING (load balancers stop sending), then stops with
a grace period so in-flight calls finish, then runs its own clean-up (deregister, hand back
work) — the order vLLM's gRPC server uses.

**Liveness and readiness.** ``grpc.health.v1`` answers for three names: ``"liveness"``
(SERVING while the process runs its loop: restart it if not), and ``""`` and the service's
own name (readiness: SERVING only while it can do its job — the scheduler with Redis and the
lease, a worker registered, a gateway with a scheduler). Load balancers and ``accelgen up`` ask
readiness; a supervisor asks liveness.
"""

from __future__ import annotations

import asyncio
import ipaddress
import signal
import socket
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from accelgen.common.authz import RoleGuard
from accelgen.common.decode_guard import DecodeGuard
from accelgen.common.tls import Transport, open_channel

LIVENESS = "liveness"  # the health name a supervisor asks; the others are readiness

KEEPALIVE_TIME_MS = 10_000
_MESSAGE_LIMITS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]

# Keep connections alive through idle periods and detect dead peers in seconds, not minutes.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    *_MESSAGE_LIMITS,
]

# What a server accepts must match what our clients send: gRPC servers by default allow a ping
# only every 5 minutes without data and answer a third "too early" ping with GOAWAY
# (too_many_pings), which cut WatchMany and plan streams. Allow one every half keepalive period,
# with or without calls in flight, and ping idle clients back so a dead one is noticed.
SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    ("grpc.http2.max_ping_strikes", 0),  # 0: never GOAWAY a client for pinging
    ("grpc.http2.max_pings_without_data", 0),
    # gRPC sets SO_REUSEPORT by default: a second server on a taken port binds beside the first
    # and the kernel splits connections between them (two workers silently sharing 50061).
    # Off, a taken port fails at start.
    ("grpc.so_reuseport", 0),
    *_MESSAGE_LIMITS,
]


def channel_target(addresses: str) -> str:
    """The gRPC target for one address or a comma-separated list of them (a leader and its
    standbys). A list becomes an ``ipv4:``/``ipv6:`` target with gRPC's default pick_first
    policy: the channel connects to the first address that accepts, and after a break tries them
    again in order. A standby scheduler does not listen until it holds the lease, so the channel
    finds whichever is the leader. Hostnames in a list are refused (gRPC's list syntax takes IP
    literals); give one DNS name with several records instead (``dns:///scheduler.internal:50051``).
    """
    parts = [a.strip() for a in addresses.split(",") if a.strip()]
    if not parts:
        raise ValueError("no address given")
    if len(parts) == 1:
        return parts[0]
    hosts = []
    for part in parts:
        host, sep, port = part.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"address {part!r} in a list must be HOST:PORT")
        host = "127.0.0.1" if host == "localhost" else host
        hosts.append((host.strip("[]"), port))
    try:
        families = {ipaddress.ip_address(h).version for h, _ in hosts}
    except ValueError:
        raise ValueError(f"a list of addresses must use IP literals, got {addresses!r} "
                         "(for hostnames use one DNS name with several records)") from None
    if len(families) > 1:
        raise ValueError(f"a list of addresses must be all IPv4 or all IPv6, got {addresses!r}")
    if families == {4}:
        return "ipv4:" + ",".join(f"{h}:{p}" for h, p in hosts)
    return "ipv6:" + ",".join(f"[{h}]:{p}" for h, p in hosts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_server(service_names: Iterable[str], transport: Transport | None = None,
                roles: Mapping[str, str] | None = None, options: Sequence[tuple[str, Any]] = (),
                ) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """An aio server with health and reflection registered for ``service_names``. With a secure
    ``transport`` and a ``roles`` table (full method name -> role, ``accelgen.common.authz``)
    every call is authorised by the role in the caller's certificate. ``options`` override
    ``SERVER_OPTIONS`` by key."""
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if transport is not None and transport.secure and roles is not None:
        interceptors.append(RoleGuard(roles))  # first: a caller without the role learns nothing more
    interceptors.append(DecodeGuard())  # bad bytes: INVALID_ARGUMENT
    merged = {**dict(SERVER_OPTIONS), **dict(options)}
    server = grpc.aio.server(options=list(merged.items()), interceptors=interceptors)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    reflection.enable_server_reflection(names + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                                 reflection.SERVICE_NAME], server)
    return server, health_servicer


class CannotListen(RuntimeError):
    """The server's address cannot be bound (a start-up failure: exit status 2)."""


def listen(server: grpc.aio.Server, host: str, port: int, credentials: grpc.ServerCredentials | None) -> int:
    """Bind ``host:port`` (TLS with ``credentials``, else plaintext); the bound port. CannotListen
    naming the address when it cannot be bound (taken: SO_REUSEPORT is off; not this machine's)."""
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        bound = (server.add_secure_port(address, credentials) if credentials is not None
                 else server.add_insecure_port(address))
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise CannotListen(f"cannot listen on {address}: the port is taken or the address is not this machine's")
    return bound


async def set_serving(health_servicer: health.aio.HealthServicer, names: Iterable[str], serving: bool) -> None:
    """Readiness: ``names`` and ``""``."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in list(names) + [""]:
        await health_servicer.set(name, status)


async def set_alive(health_servicer: health.aio.HealthServicer, alive: bool) -> None:
    """Liveness: the ``"liveness"`` name."""
    status = health_pb2.HealthCheckResponse.SERVING if alive else health_pb2.HealthCheckResponse.NOT_SERVING
    await health_servicer.set(LIVENESS, status)


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
    mark_ready: bool = True,
) -> None:
    """Serve until ``stop`` is set: NOT_SERVING, then stop(grace), then ``on_stop``. Liveness is
    SERVING meanwhile; readiness too if ``mark_ready`` (else the service sets it as its
    dependencies come and go)."""
    names = list(names)
    await set_alive(health_servicer, True)
    if mark_ready:
        await set_serving(health_servicer, names, True)
    await stop.wait()
    await set_serving(health_servicer, names, False)
    await set_alive(health_servicer, False)
    await server.stop(grace_s)
    if on_stop is not None:
        await on_stop()


class FailoverChannel:
    """A client channel to a leader among several addresses that moves on when the address it
    is connected to stops answering.

    pick_first keeps a connection to a process that is alive at the TCP level but answers
    nothing (a SIGSTOPped or wedged scheduler) until keepalive gives up on it, and then tries the
    addresses again in the same order, first the same wedged one: the campaign measured a minute
    before workers reached the new leader. After ``failures_to_rotate`` failed calls in a row the
    caller reports, a new channel is opened on the list rotated by one (the old one is closed),
    so the next connection attempt starts at the next address. Stubs must be made from
    ``channel`` after every ``failed()`` that returns True (``generation`` counts them)."""

    def __init__(self, addresses: str, options: list[tuple[str, Any]], failures_to_rotate: int = 2,
                 transport: Transport | None = None, peer_role: str = "scheduler") -> None:
        self._addresses = [a.strip() for a in addresses.split(",") if a.strip()]
        channel_target(addresses)  # validates the list
        self._options = options
        self._transport = transport  # None or plaintext: an insecure channel
        self._peer_role = peer_role  # who the server must prove to be (with TLS)
        self._failures_to_rotate = failures_to_rotate
        self._failures = 0
        self._offset = 0
        self.generation = 0
        self.channel = self._open()
        self._closing: set[asyncio.Task[None]] = set()

    def _open(self) -> grpc.aio.Channel:
        rotated = self._addresses[self._offset:] + self._addresses[:self._offset]
        return open_channel(channel_target(",".join(rotated)), self._options, self._transport, self._peer_role)

    def succeeded(self) -> None:
        self._failures = 0

    def failed(self) -> bool:
        """A call failed (deadline, unavailable). True when the channel was replaced."""
        self._failures += 1
        if self._failures < self._failures_to_rotate or len(self._addresses) < 2:
            return False
        self._failures = 0
        self._offset = (self._offset + 1) % len(self._addresses)
        old, self.channel = self.channel, self._open()
        self.generation += 1
        task = asyncio.get_running_loop().create_task(old.close(grace=None))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        return True

    async def close(self) -> None:
        await self.channel.close()
        if self._closing:
            await asyncio.wait(self._closing, timeout=5.0)
