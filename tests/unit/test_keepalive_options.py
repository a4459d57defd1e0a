"""Servers accept what clients send: a server that thinks our keepalive pings come too often
answers GOAWAY ``too_many_pings`` and cuts every long-lived stream (WatchMany, plan calls)."""

from __future__ import annotations

from pathlib import Path

import pytest

from accelgen.common.grpc_server import CHANNEL_OPTIONS, SERVER_OPTIONS

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def test_servers_accept_the_clients_ping_rate() -> None:
    client, server = dict(CHANNEL_OPTIONS), dict(SERVER_OPTIONS)
    ping_every_ms = client["grpc.keepalive_time_ms"]
    # Pings come every keepalive_time_ms, with or without calls in flight.
    assert client["grpc.keepalive_permit_without_calls"] == 1
    assert server["grpc.keepalive_permit_without_calls"] == 1
    # The server must not count them as too early (it allows one per this interval) ...
    assert server["grpc.http2.min_recv_ping_interval_without_data_ms"] <= ping_every_ms
    # ... and even if it did, must not GOAWAY for it (0 strikes = unlimited), or allow enough.
    assert server.get("grpc.http2.max_ping_strikes", 2) == 0
    # Clients send pings without data frames in between; a limit would silence them.
    assert client["grpc.http2.max_pings_without_data"] == 0
    assert server["grpc.http2.max_pings_without_data"] == 0
    # The same message limits both ways.
    for key in ("grpc.max_send_message_length", "grpc.max_receive_message_length"):
        assert server[key] == client[key]


def test_every_gateway_channel_uses_the_shared_options() -> None:
    """A channel built without CHANNEL_OPTIONS pings on gRPC's defaults (and never notices a dead
    peer): every channel the gateway opens goes through GATEWAY_CHANNEL_OPTIONS."""
    from gateway.scheduler_client import GATEWAY_CHANNEL_OPTIONS

    assert all(opt in GATEWAY_CHANNEL_OPTIONS for opt in CHANNEL_OPTIONS)
    import re

    found = 0
    for path in sorted((REPO / "gateway").glob("*.py")):
        text = path.read_text()
        for m in re.finditer(r"secure_channel\(|FailoverChannel\(", text):
            call = text[m.start():text.find(")\n", m.start()) + 1]  # the call, across its lines
            assert "GATEWAY_CHANNEL_OPTIONS" in call, f"{path.name}: a channel without the shared options: {call}"
            found += 1
    assert found >= 1
