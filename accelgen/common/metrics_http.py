"""Prometheus ``/metrics`` over plain HTTP, served on the service's own event loop.

prometheus_client's ``start_http_server`` answers scrapes on a thread of its own; our collectors
read the scheduler's live state (lanes, queues, KV accounting) at scrape time, and that state
belongs to the event loop: read from another thread, a dict could change size mid-iteration. So
the scrape runs on the loop, like every other handler: a scrape costs the loop one collection
(well under a millisecond for a few thousand requests), and nothing needs a lock.

Each process passes its own ``CollectorRegistry`` (never the global default), so several
services started in one test process do not collide on metric names.

``render`` is the one place a registry becomes text (the gateway serves it from its FastAPI app).
Only ``GET /metrics`` (and ``HEAD``) is served; anything else is 404 or 405. A request head over
8 KiB or slower than 5 s ends the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, disable_created_metrics, generate_latest

log = structlog.get_logger("metrics_http")
# No ``*_created`` series (a timestamp per counter and histogram child): they double the text of
# every scrape and nothing here reads them (vLLM turns them off too). A process-wide switch of
# prometheus_client, set by whoever renders metrics.
disable_created_metrics()

MAX_HEAD_BYTES = 8 << 10
HEAD_TIMEOUT_S = 5.0


@dataclass
class MetricsServer:
    """A running metrics endpoint; ``port`` is the bound one (resolved when 0 was asked for)."""

    server: asyncio.AbstractServer
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    async def stop(self) -> None:
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 1.0)


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8", head: bool = False) -> bytes:
    header = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
              "Connection: close\r\n\r\n").encode()
    return header if head else header + body


def render(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text format (what a scrape returns)."""
    return generate_latest(registry)


async def start_metrics_server(registry: CollectorRegistry, host: str, port: int) -> MetricsServer:
    """Serve ``registry`` at ``http://host:port/metrics`` (port 0: a free one). OSError if the
    port cannot be bound (the caller says which setting to change)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ConnectionError):
                return
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            method, path = (parts[0], parts[1]) if len(parts) >= 2 else ("", "")
            if method not in ("GET", "HEAD"):
                writer.write(_response("405 Method Not Allowed", b"only GET /metrics\n"))
            elif path.split("?", 1)[0] != "/metrics":
                writer.write(_response("404 Not Found", b"see /metrics\n", head=method == "HEAD"))
            else:
                writer.write(_response("200 OK", render(registry), CONTENT_TYPE_LATEST, head=method == "HEAD"))
            await writer.drain()
        except ConnectionError:
            pass
        except Exception:  # a collector that fails must not take the server down: the scrape fails
            log.exception("metrics_scrape_failed")
            with contextlib.suppress(Exception):
                writer.write(_response("500 Internal Server Error", b"collection failed; see the service log\n"))
                await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, host.strip("[]"), port, limit=MAX_HEAD_BYTES)
    bound = int(server.sockets[0].getsockname()[1])
    return MetricsServer(server, host, bound)
