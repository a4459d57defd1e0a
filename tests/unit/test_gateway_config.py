"""Gateway configuration: validation, env overrides, CLI flags; OpenAI body parsing; Watch trimming."""

from __future__ import annotations

import asyncio

import pytest

from accelgen.v1 import scheduler_pb2
from gateway.config import LOADER, GatewayConfig
from gateway.errors import GatewayError
from gateway.openai_protocol import parse_request
from gateway.scheduler_client import SchedulerClient, _trim

pytestmark = pytest.mark.unit


def test_defaults_are_valid_and_bad_values_refused() -> None:
    cfg = GatewayConfig()
    assert cfg.default_app_class == "chat" and cfg.reconnect_timeout_s == 60 and cfg.submit_timeout_s == 10
    assert cfg.tokenizer_path is None
    for bad in (dict(grpc_port=-1), dict(http_port=-2), dict(reconnect_timeout_s=0), dict(default_app_class=""),
                dict(slo_tbt_ms_min=100, slo_tbt_ms_max=10), dict(log_level="LOUD")):
        with pytest.raises(ValueError):
            GatewayConfig(**bad)
    assert GatewayConfig(http_port=-1).http_port == -1


def test_env_overrides_then_cli(tmp_path) -> None:
    env = {"ACCELGEN_GATEWAY_GRPC_PORT": "7000", "ACCELGEN_GATEWAY_MODEL": "/models/x",
           "ACCELGEN_GATEWAY_RECONNECT_TIMEOUT_S": "5.5", "UNRELATED": "1"}
    cfg = LOADER.load(env=env)
    assert (cfg.grpc_port, cfg.model, cfg.reconnect_timeout_s) == (7000, "/models/x", 5.5)
    with pytest.raises(ValueError, match="ACCELGEN_GATEWAY_GRPC_PORT='many' is not a valid int"):
        LOADER.load(env={"ACCELGEN_GATEWAY_GRPC_PORT": "many"})
    out = LOADER.parse(["--http-port", "-1", "--scheduler-address", "s:1", "--insecure"], env)
    assert (out.grpc_port, out.http_port, out.scheduler_address, out.model) == (7000, -1, "s:1", "/models/x")
    assert "reconnect" in LOADER.parser().format_help()
    # A config file (new for the gateway) sits below the environment.
    path = tmp_path / "gateway.toml"
    path.write_text('grpc_port = 6000\nhttp_port = 6001\ndefault_app_class = "code"\n')
    out = LOADER.parse(["--config", str(path)], env)
    assert (out.grpc_port, out.http_port, out.default_app_class) == (7000, 6001, "code")


def test_watch_timeout_is_gone() -> None:
    """The per-request Watch fallback went; so did its deadline, its variable and its flag."""
    assert not hasattr(GatewayConfig(), "watch_timeout_s")
    assert "--watch-timeout-s" not in LOADER.parser().format_help()
    with pytest.raises(SystemExit):
        LOADER.parse(["--watch-timeout-s", "5"], {})


def _parse(body: dict, headers: dict | None = None, kind: str = "completion"):
    return parse_request(kind, body, headers or {})  # type: ignore[arg-type]


def test_openai_body_to_generate_request() -> None:
    p = _parse({"prompt": "hi", "temperature": 0.5, "top_k": -1, "seed": 1, "stream": True,
                "stream_options": {"include_usage": True}, "logprobs": None, "repetition_penalty": 1.0},
               {"x-accelgen-slo-ttft-ms": "250", "x-accelgen-slo-tbt-ms": "25", "x-request-id": "r-1"})
    g = p.generate
    assert g.text == "hi" and g.request_id == "r-1" and g.stream and p.include_usage
    assert g.sampling_params.temperature == 0.5 and g.sampling_params.top_k == 0
    assert g.sampling_params.max_new_tokens == 16  # the completions default
    assert (g.slo.ttft_ms, g.slo.tbt_ms) == (250, 25)
    assert _parse({"prompt": [[1, 2]]}).generate.tokenized.input_ids == [1, 2]
    chat = _parse({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                            {"type": "text", "text": "b"}]}],
                   "max_completion_tokens": 3}, kind="chat")
    assert chat.messages == [{"role": "user", "content": "a\nb"}]
    assert chat.generate.sampling_params.max_new_tokens == 3 and chat.names["max_new_tokens"] == "max_completion_tokens"


@pytest.mark.parametrize("body, headers, param", [
    ({"prompt": [[1], "two", 3]}, {}, "prompt"),
    ({"prompt": [1, -2]}, {}, "prompt"),
    ({"prompt": 5}, {}, "prompt"),
    ({"prompt": "x", "n": True}, {}, "n"),
    ({"prompt": "x", "stream": "yes"}, {}, "stream"),
    ({"prompt": "x", "stop_token_ids": [1.5]}, {}, "stop_token_ids"),
    ({"prompt": "x"}, {"x-accelgen-slo-tbt-ms": "fast"}, "x-accelgen-slo-tbt-ms"),
    ({"prompt": "x", "slo_jct_ms": "soon"}, {}, "slo_jct_ms"),
])
def test_openai_body_errors_name_the_field(body, headers, param) -> None:
    with pytest.raises(GatewayError) as err:
        _parse(body, headers)
    assert err.value.param == param and param in err.value.message


def test_trim_drops_what_was_delivered_and_spots_gaps() -> None:
    batch = scheduler_pb2.TokenBatch(token_ids=[10, 11, 12], start_index=4, emitted_at=[1.0, 2.0, 3.0])
    assert _trim(batch, 4) is batch
    trimmed = _trim(batch, 6)
    assert list(trimmed.token_ids) == [12] and trimmed.start_index == 6 and list(trimmed.emitted_at) == [3.0]
    assert list(_trim(batch, 9).token_ids) == []
    assert _trim(batch, 3) is None  # tokens 3 missing: re-watch instead of skipping it


def test_no_cancel_while_draining() -> None:
    """Streams cut by a gateway shutdown are not the client's doing: their requests keep running."""

    async def check() -> tuple[int, int]:
        client = SchedulerClient(GatewayConfig(scheduler_address="127.0.0.1:1", rpc_timeout_s=0.2))
        client.draining = True
        client.cancel_in_background("r1")
        draining = len(client._background)
        client.draining = False
        client.cancel_in_background("r2")
        live = len(client._background)
        await client.close()
        return draining, live

    assert asyncio.run(check()) == (0, 1)


def test_client_certificate_settings_go_together_and_need_client_tls() -> None:
    """client_cert/client_key: a pair, served only with client_tls, and enough for it without
    tls_dir (a gateway whose scheduler is on loopback needs no deployment certificates)."""
    for bad, message in ((dict(client_tls=True, client_cert="c.pem"), "go together"),
                         (dict(client_tls=True, client_key="k.pem"), "go together"),
                         (dict(client_cert="c.pem", client_key="k.pem"), "only with client_tls"),
                         (dict(client_tls=True), "client_tls needs client_cert and client_key, or tls_dir"),
                         (dict(max_header_bytes=100), "max_header_bytes must be at least 1024")):
        with pytest.raises(ValueError, match=message):
            GatewayConfig(**bad)
    cfg = GatewayConfig(client_tls=True, client_cert="c.pem", client_key="k.pem")  # files are read at start
    assert (cfg.client_cert, cfg.tls_dir, cfg.max_header_bytes) == ("c.pem", None, 64 << 10)
    assert GatewayConfig().client_identity is None
    env = {"ACCELGEN_GATEWAY_CLIENT_TLS": "true", "ACCELGEN_GATEWAY_CLIENT_CERT": "/etc/tls/public.crt",
           "ACCELGEN_GATEWAY_CLIENT_KEY": "/etc/tls/public.key"}
    assert LOADER.load(env=env).client_key == "/etc/tls/public.key"
