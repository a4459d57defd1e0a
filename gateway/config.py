"""The gateway's configuration: one typed, validated dataclass, read by the common loader.

Precedence (``accelgen.common.config``): field defaults < a config file (``--config`` or
``ACCELGEN_GATEWAY_CONFIG``) < ``ACCELGEN_GATEWAY_<FIELD>`` environment variables < command-line
flags. Each field's help text is its CLI help, so the flags document themselves.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import uuid
from dataclasses import dataclass, field, fields
from typing import Any

from accelgen.common.config import ConfigLoader
from accelgen.common.grpc_server import channel_target
from accelgen.common.tls import Transport, check_transport
from accelgen.wire.slo import SLOBounds
from gateway.auth import ApiKey, LimitDefaults, load_keys
from gateway.client_tls import ClientIdentity


ENV_PREFIX = "ACCELGEN_GATEWAY_"


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class GatewayConfig:
    """Everything a gateway process needs; several gateways may share one scheduler."""

    scheduler_address: str = _f("127.0.0.1:50051", "host:port of the scheduler's gRPC service, or a comma-separated "
                                                    "list of IP:PORT (the leader and its standbys: a standby "
                                                    "listens only once it leads, and the gateway connects to "
                                                    "whichever does)")
    instance_id: str = _f("", "this gateway's id, sent with its Submits and WatchMany streams: the scheduler "
                              "cancels the requests of a gateway gone longer than its owner_gone_cancel_s "
                              "(default: random per process; a restarted gateway is a new owner)")
    host: str = _f("127.0.0.1", "interface the gRPC and HTTP servers listen on (0.0.0.0: every interface; "
                                "then configure API keys, and client_tls where the network is not trusted)")
    grpc_port: int = _f(50050, "gRPC port of the Gateway service (0 = any free port)")
    http_port: int = _f(8000, "OpenAI-compatible HTTP port (0 = any free port, -1 = no HTTP server)")
    model: str | None = _f(None, "HF model directory or name whose tokenizer is used; unset or 'sim' = "
                                 "the byte tokenizer of the sim executor")
    tokenizer: str | None = _f(None, "tokenizer directory or name, when it differs from --model")
    served_model_name: str = _f("", "other names clients may give as `model` over HTTP, comma-separated (as "
                                    "vLLM's --served-model-name); the scheduler's model name and --model "
                                    "are always accepted, any other name is 404")
    default_app_class: str = _f("chat", "application class of requests that name none")
    slo_ttft_ms_min: float = _f(10.0, "smallest TTFT SLO a client may ask for (ms)")
    slo_ttft_ms_max: float = _f(600_000.0, "largest TTFT SLO a client may ask for (ms)")
    slo_tbt_ms_min: float = _f(5.0, "smallest TBT SLO a client may ask for (ms)")
    slo_tbt_ms_max: float = _f(60_000.0, "largest TBT SLO a client may ask for (ms)")
    slo_jct_ms_min: float = _f(100.0, "smallest JCT SLO a client may ask for (ms)")
    slo_jct_ms_max: float = _f(86_400_000.0, "largest JCT SLO a client may ask for (ms)")
    slo_tbt_tolerance: float = _f(0.05, "fraction of late gaps a request may have and still count as "
                                        "meeting its TBT SLO (same rule as the scheduler's metrics)")
    reconnect_timeout_s: float = _f(60.0, "how long a broken token stream is re-watched before the "
                                          "client gets UNAVAILABLE (covers a scheduler restart)")
    stream_idle_timeout_s: float = _f(30.0, "a watched request that gets no token for this long is checked "
                                            "with GetRequest: progress the stream did not deliver re-opens the "
                                            "stream from the delivered index; a request still queued is waited "
                                            "for; an unreachable scheduler fails it after reconnect_timeout_s")
    health_check_interval_s: float = _f(2.0, "how often the scheduler is checked for readiness (the gateway "
                                             "is ready, gRPC health and HTTP /health, only while it answers)")
    submit_timeout_s: float = _f(10.0, "deadline of Submit calls to the scheduler (s)")
    rpc_timeout_s: float = _f(5.0, "deadline of Cancel, GetRequest and GetServerInfo calls (s)")
    server_info_ttl_s: float = _f(30.0, "how long the scheduler's ServerInfo (model, context length) "
                                        "is cached (s)")
    grace_s: float = _f(5.0, "on SIGTERM, how long in-flight requests may finish (s)")
    max_body_bytes: int = _f(4 << 20, "largest HTTP request body accepted (bytes); a larger one is refused with 413")
    max_header_bytes: int = _f(64 << 10, "largest HTTP request head (request line and headers) accepted (bytes); a "
                                         "larger one is refused with 400 and the connection closed, before the API "
                                         "key is looked at")
    log_level: str = _f("INFO", "DEBUG, INFO, WARNING or ERROR")
    # -- clients: API keys, per-key limits, input caps (gateway.auth, gateway.limits) --
    api_key: list[str] = field(default_factory=list, repr=False, metadata={"env": "ACCELGEN_API_KEY", "help": (
        "an API key clients must send (`authorization: Bearer KEY`), at least 16 characters; repeat the flag "
        "for several (a key on the command line shows in `ps`: prefer api_keys or the environment). No key "
        "and no api_keys: the gateway is open")})
    api_keys: str | None = _f(None, "file of API keys: one per line, # comments, optional settings after the key: "
                                    "name=TENANT rate=REQ_PER_S burst=N concurrency=N classes=chat,code")
    key_rate_per_s: float = _f(0.0, "calls per second per API key, every authenticated call counted (Generate, "
                                    "Attach, GetRequest, Cancel, every /v1 route), for keys without rate=, per "
                                    "gateway process (0 = unlimited); over it: 429 / RESOURCE_EXHAUSTED")
    key_burst: int = _f(0, "requests a key may make at once above its rate, for keys without burst= "
                           "(0 = one second's worth)")
    key_max_concurrent: int = _f(0, "streams in flight per API key, for keys without concurrency=, per gateway "
                                    "process (0 = unlimited)")
    max_prompt_chars: int = _f(1 << 20, "longest text prompt (characters; for chat, all message contents "
                                        "together), refused before it is tokenised")
    max_messages: int = _f(1024, "most chat messages in one request")
    max_message_bytes: int = _f(4 << 20, "largest gRPC message a client may send (bytes); a larger one is "
                                         "refused by gRPC with RESOURCE_EXHAUSTED")
    tls_dir: str | None = _f(None, "mutual TLS to the scheduler: a directory with ca.crt, gateway.crt and "
                                   "gateway.key (`accelgen certs`); required unless the scheduler is on loopback "
                                   "or --insecure")
    insecure: bool = _f(False, "plaintext gRPC to a scheduler that is not on loopback: anyone on the path can "
                               "read and change requests")
    client_tls: bool = _f(False, "serve clients over TLS too (gRPC and HTTPS) with client_cert/client_key (default: "
                                 "gateway.crt/gateway.key from tls_dir); no client certificate asked")
    client_cert: str | None = _f(None, "with client_tls: the certificate (PEM, its chain after it) served to clients, "
                                       "e.g. a public CA's for the names clients dial; only the client-facing servers "
                                       "use it (default: tls_dir's gateway.crt, whose key also opens the scheduler)")
    client_key: str | None = _f(None, "with client_tls: client_cert's private key (PEM, unencrypted)")

    def __post_init__(self) -> None:
        if not self.instance_id:
            object.__setattr__(self, "instance_id", "gw-" + uuid.uuid4().hex[:12])
        try:
            channel_target(self.scheduler_address)
        except ValueError as exc:
            raise ValueError(f"scheduler_address: {exc}") from None
        for name in ("grpc_port", "http_port"):
            port = getattr(self, name)
            low = -1 if name == "http_port" else 0
            if not low <= port <= 65535:
                raise ValueError(f"{name} must be in [{low}, 65535], got {port}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "float" and f.name != "key_rate_per_s" and not (
                    isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{f.name} must be a positive finite number, got {value}")
        for kind in ("ttft", "tbt", "jct"):
            lo, hi = getattr(self, f"slo_{kind}_ms_min"), getattr(self, f"slo_{kind}_ms_max")
            if lo > hi:
                raise ValueError(f"slo_{kind}_ms_min ({lo}) must not exceed slo_{kind}_ms_max ({hi})")
        if self.slo_tbt_tolerance >= 1:
            raise ValueError(f"slo_tbt_tolerance must be in (0, 1), got {self.slo_tbt_tolerance}")
        if not self.default_app_class:
            raise ValueError("default_app_class must name a class (the scheduler's classes are checked per request)")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"log_level must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")
        self._check_client_limits()
        # Internal traffic only: the client-facing ports are TLS with client_tls (and keys guard them).
        check_transport("gateway", self.tls_dir, self.insecure, binds=[],
                        dials=[("scheduler_address", self.scheduler_address)])
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together: give both (or neither, for tls_dir's gateway pair)")
        if self.client_cert and not self.client_tls:
            raise ValueError("client_cert and client_key are served only with client_tls: set client_tls = true")
        if self.client_tls and not self.tls_dir and not self.client_cert:
            raise ValueError("client_tls needs client_cert and client_key, or tls_dir (then gateway.crt and "
                             "gateway.key are served)")

    @functools.cached_property
    def transport(self) -> Transport:
        """This gateway's certificates (read once): its channel to the scheduler."""
        return Transport.load("gateway", self.tls_dir)

    @functools.cached_property
    def client_identity(self) -> ClientIdentity | None:
        """What the client-facing servers present with client_tls (read once; None without it):
        client_cert/client_key, else tls_dir's gateway pair. ValueError when they do not load
        or do not match."""
        if not self.client_tls:
            return None
        if self.client_cert and self.client_key:
            return ClientIdentity.load(self.client_cert, self.client_key)
        return ClientIdentity.load(self.transport.cert_path, self.transport.key_path)  # type: ignore[arg-type]

    def _check_client_limits(self) -> None:
        if not (math.isfinite(self.key_rate_per_s) and self.key_rate_per_s >= 0):
            raise ValueError(f"key_rate_per_s must be a finite number >= 0 (0 = unlimited), got {self.key_rate_per_s}")
        for name in ("key_burst", "key_max_concurrent"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = unlimited), got {getattr(self, name)}")
        if self.max_header_bytes < 1024:
            raise ValueError(f"max_header_bytes must be at least 1024, got {self.max_header_bytes}")
        for name in ("max_prompt_chars", "max_messages", "max_message_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        object.__setattr__(self, "_keys", load_keys(self.api_key, self.api_keys))  # read and checked once

    @property
    def keys(self) -> tuple[ApiKey, ...]:
        """The configured API keys, as digests (empty: an open gateway)."""
        return self._keys  # type: ignore[attr-defined, no-any-return]

    @property
    def limit_defaults(self) -> LimitDefaults:
        return LimitDefaults(self.key_rate_per_s, self.key_burst, self.key_max_concurrent)

    def model_names(self, scheduler_model: str) -> set[str]:
        """Every name a client may give as ``model``."""
        names = {n.strip() for n in self.served_model_name.split(",") if n.strip()}
        names.update(n for n in (self.model, scheduler_model) if n)
        return names

    @property
    def tokenizer_path(self) -> str | None:
        """Where the tokenizer comes from (None = byte tokenizer)."""
        return self.tokenizer or self.model

    @property
    def slo_bounds(self) -> SLOBounds:
        """What a client may ask for, checked with the rest of the SLO (``accelgen.wire.slo``)."""
        return SLOBounds(**{f"{kind}_ms": (getattr(self, f"slo_{kind}_ms_min"), getattr(self, f"slo_{kind}_ms_max"))
                            for kind in ("ttft", "tbt", "jct")})

    def replace(self, **changes: Any) -> "GatewayConfig":
        return dataclasses.replace(self, **changes)


LOADER: ConfigLoader[GatewayConfig] = ConfigLoader(GatewayConfig, "gateway")
