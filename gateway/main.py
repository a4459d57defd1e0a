"""Start the gateway: the gRPC Gateway service and the OpenAI HTTP server in one event loop.

``start_gateway`` is the factory tests bind to port 0; ``run`` serves until SIGTERM/SIGINT;
``python -m gateway.main`` is the process entry point. Shutdown follows the order every
AccelGen server uses: report NOT_SERVING (and 503 on /health) so load balancers stop sending,
stop both servers with a grace period for in-flight streams, then close the scheduler channel.

Liveness (``grpc.health.v1`` name ``"liveness"``, HTTP ``/livez``) is SERVING while the process
runs. Readiness (``""`` and ``accelgen.v1.Gateway``, HTTP ``/health``) follows the scheduler:
checked every ``health_check_interval_s``, the gateway is ready only while the scheduler answers
(and says it is ready, where it has a health service) — a load balancer then sends no request
that could only fail with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass
from typing import Sequence

import grpc
import structlog
import uvicorn
from fastapi import FastAPI
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from accelgen.common.config import ConfigError
from accelgen.common.grpc_server import CannotListen, install_sigterm, listen, make_server, set_alive, set_serving
from accelgen.common.tls import is_loopback, read_certificates
from gateway.config import LOADER, GatewayConfig
from gateway.generation import GenerationService
from gateway.grpc_server import SERVICE_NAME, add_to_server
from gateway.http_extras import add_routes
from gateway.limits import server_options
from gateway.metrics import add_metrics_route
from gateway.openai_http import create_app
from gateway.scheduler_client import RESUMABLE, SchedulerClient
from gateway.tokenizer import load_tokenizer

log = structlog.get_logger("gateway")

SCHEDULER_SERVICE = "accelgen.v1.Scheduler"
EXIT_CANNOT_START = 2  # a port taken: not worth restarting (systemd's RestartPreventExitStatus=2)


async def scheduler_ready(client: SchedulerClient, timeout_s: float) -> tuple[bool, str]:
    """Whether the scheduler can take requests: its readiness where it has a health service,
    else whether it answers GetServerInfo (which also refreshes the cached model and limits).
    Tells ``client`` whether the scheduler answered, so it can leave one that stopped answering."""
    try:
        reply = await health_pb2_grpc.HealthStub(client.channel).Check(
            health_pb2.HealthCheckRequest(service=SCHEDULER_SERVICE), timeout=timeout_s)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            return False, "the scheduler reports NOT_SERVING"
        client.scheduler_answered()
        return True, ""
    except grpc.aio.AioRpcError as exc:
        if exc.code() in RESUMABLE:
            return _not_answered(client, exc)
    try:  # no health service (or no such name): answering is enough
        await client.server_info(refresh=True)
    except grpc.aio.AioRpcError as exc:
        return _not_answered(client, exc)
    client.scheduler_answered()
    return True, ""


def _not_answered(client: SchedulerClient, exc: grpc.aio.AioRpcError) -> tuple[bool, str]:
    if exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
        client.scheduler_unreachable()
    return False, f"{exc.code().name}: {exc.details()}"


async def _readiness_loop(client: SchedulerClient, health_servicer: health.aio.HealthServicer,
                          app: FastAPI | None, config: GatewayConfig, checked: asyncio.Event) -> None:
    ready: bool | None = None
    while True:
        ok, why = await scheduler_ready(client, min(config.rpc_timeout_s, max(1.0, config.health_check_interval_s)))
        if ok != ready and not client.draining:
            ready = ok
            await set_serving(health_servicer, [SERVICE_NAME], ok)
            if app is not None:
                app.state.ready = ok
            if ok:
                log.info("gateway_ready", scheduler=config.scheduler_address)
            else:
                log.warning("gateway_not_ready", scheduler=config.scheduler_address, reason=why)
        checked.set()
        await asyncio.sleep(config.health_check_interval_s)


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn inside our loop: it must not take over SIGTERM (it re-raises it after shutdown)."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield


@dataclass
class GatewayHandle:
    """A running gateway: its bound ports, and ``stop()`` for a graceful shutdown."""

    grpc_port: int
    http_port: int | None
    config: GatewayConfig
    _server: grpc.aio.Server
    _health: health.aio.HealthServicer
    _client: SchedulerClient
    _http: _EmbeddedUvicorn | None
    _http_task: asyncio.Task[None] | None
    _app: FastAPI | None
    _readiness: asyncio.Task[None] | None = None
    _stopped: bool = False

    async def stop(self) -> None:
        """NOT_SERVING, then both servers drain for ``grace_s``, then the scheduler channel closes.

        Requests whose streams are cut by the shutdown keep running at the scheduler (no
        cancel-on-abandon while draining): a gateway restart must lose no accepted request.
        """
        if self._stopped:
            return
        self._stopped = True
        self._client.draining = True
        if self._readiness is not None:
            self._readiness.cancel()
        await set_serving(self._health, [SERVICE_NAME], False)
        if self._app is not None:
            self._app.state.draining = True
        if self._http is not None:
            self._http.should_exit = True
        # Both drain at once: in-flight gRPC and HTTP streams share one grace period.
        await asyncio.gather(self._server.stop(self.config.grace_s),
                             *([self._http_task] if self._http_task is not None else []))
        await self._client.close()
        await set_alive(self._health, False)
        log.info("gateway_stopped")


def _bind(host: str, port: int) -> socket.socket:
    # proto=IPPROTO_TCP matters: asyncio turns on TCP_NODELAY only for sockets that say they are
    # TCP, and without it small SSE chunks wait for delayed ACKs (measured: +28 ms per request).
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def start_gateway(config: GatewayConfig) -> GatewayHandle:
    """Start both servers; returns once they accept connections (ports resolved when 0)."""
    identity = config.client_identity  # read first: a bad client certificate leaves nothing started
    tokenizer = load_tokenizer(config.tokenizer_path)
    client = SchedulerClient(config)
    service = GenerationService(client, tokenizer, config)

    # Client-facing: no client certificates, no roles; gRPC refuses a message over max_message_bytes.
    server, health_servicer = make_server([SERVICE_NAME], options=server_options(config.max_message_bytes))
    add_to_server(server, service)
    transport = config.transport
    try:
        grpc_port = listen(server, config.host, config.grpc_port,
                           identity.grpc_credentials() if identity is not None else None)
    except CannotListen:
        await client.close()
        raise
    await server.start()
    await set_alive(health_servicer, True)
    await set_serving(health_servicer, [SERVICE_NAME], False)  # until the scheduler answers

    http = http_task = app = None
    http_port: int | None = None
    if config.http_port >= 0:
        app = create_app(service)
        app.state.ready = False
        add_routes(app, service)
        add_metrics_route(app, service.metrics)
        try:
            sock = _bind(config.host.strip("[]"), config.http_port)
        except OSError as exc:
            await server.stop(None)
            await client.close()
            raise CannotListen(f"cannot listen for HTTP on {config.host}:{config.http_port}: "
                               f"{exc.strerror or exc}") from None
        http_port = int(sock.getsockname()[1])
        tls = identity.uvicorn_options() if identity is not None else {}
        # h11, not httptools (picked when installed): httptools bounds no header block (100,000
        # headers, 3 MB, were read before the API key was checked); h11 refuses a head over
        # max_header_bytes with 400 and closes the connection (as vLLM does, GHSA-rxc4-3w6r-4v47).
        http = _EmbeddedUvicorn(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                                               http="h11", h11_max_incomplete_event_size=config.max_header_bytes,
                                               timeout_graceful_shutdown=int(max(1, config.grace_s)),
                                               log_level=config.log_level.lower(), **tls))
        http_task = asyncio.get_running_loop().create_task(http.serve(sockets=[sock]))
        while not http.started:
            if http_task.done():
                await http_task  # raises the startup failure
                raise RuntimeError("the HTTP server exited during startup")
            await asyncio.sleep(0.01)
    checked = asyncio.Event()
    readiness = asyncio.get_running_loop().create_task(_readiness_loop(client, health_servicer, app, config, checked))
    with contextlib.suppress(TimeoutError):  # ready at once when the scheduler answers at once
        await asyncio.wait_for(checked.wait(), 2.0)
    log.info("gateway_started", grpc_port=grpc_port, http_port=http_port, scheduler=config.scheduler_address,
             tokenizer=config.tokenizer_path or "byte", instance_id=config.instance_id,
             scheduler_tls=transport.secure, client_tls=config.client_tls,
             client_cert=str(identity.cert_path) if identity is not None else None)
    if not config.client_tls and not is_loopback(config.host):
        log.warning("gateway_clients_in_plaintext", host=config.host,
                    hint="prompts and outputs cross the network unencrypted; set client_tls (with client_cert and "
                         "client_key, or tls_dir) or terminate TLS in front of the gateway")
    return GatewayHandle(grpc_port=grpc_port, http_port=http_port, config=config, _server=server,
                         _health=health_servicer, _client=client, _http=http, _http_task=http_task, _app=app,
                         _readiness=readiness)


async def run(config: GatewayConfig) -> int:
    """Serve until SIGTERM or SIGINT, then shut down gracefully (0); 2 if it could not start (a
    port taken)."""
    stop = asyncio.Event()
    install_sigterm(stop)
    try:
        handle = await start_gateway(config)
    except CannotListen as exc:
        log.error("gateway_cannot_start", error=str(exc), exit_code=EXIT_CANNOT_START)
        return EXIT_CANNOT_START
    await stop.wait()
    log.info("gateway_stopping", grace_s=config.grace_s)
    await handle.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from accelgen.common.logs import setup_logging

    config = LOADER.main_config(argv, prog="accelgen gateway", description=__doc__.splitlines()[0])
    read_certificates(LOADER, config)
    try:
        config.client_identity  # client_tls's certificate: a bad one is a config error, before anything starts
    except ValueError as exc:
        LOADER.exit(ConfigError(str(exc)))
    setup_logging("gateway", config.log_level)
    return asyncio.run(run(config))


if __name__ == "__main__":
    raise SystemExit(main())
