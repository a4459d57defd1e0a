"""The worker's configuration: one typed, validated dataclass; field docs become CLI help.

Read by the common loader (``accelgen.common.config``), lowest first: field defaults, a config
file (``--config`` or ``ACCELGEN_WORKER_CONFIG``), ``ACCELGEN_WORKER_<FIELD>`` environment
variables (systemd units set these), command-line flags. The environment is read there and
nowhere else.
"""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from accelgen.common.config import ConfigLoader
from accelgen.common.grpc_server import channel_target
from accelgen.common.tls import Transport, address_hosts, check_transport, is_loopback
from accelgen.profiles import DEFAULT_PROFILE

ENV_PREFIX = "ACCELGEN_WORKER_"
_WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")
_VLLM_DTYPES = ("auto", "float32", "bfloat16", "float16", "half", "float")


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _local_ip_towards(address: str) -> str:
    """This machine's IP on the route to ``address`` (host:port): the address the scheduler can
    reach us on (127.0.0.1 for a local scheduler). A UDP connect sends nothing; it only routes.
    Falls back to the hostname when there is no route or the name does not resolve."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(host, int(port), type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(sockaddr)
            return str(s.getsockname()[0])
    except (OSError, ValueError):
        return socket.gethostname()


def _doc(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass(frozen=True)
class WorkerConfig:
    scheduler: str = _doc("host:port of the scheduler's gRPC service, where the worker registers; or a "
                          "comma-separated list ip:port,ip:port (the leader and its standbys: the worker "
                          "reaches whichever holds the lease)", default="127.0.0.1:50051")
    host: str = _doc("interface the Worker service binds to (loopback by default: a worker on another host "
                     "than its scheduler binds its address or 0.0.0.0, with --tls-dir)", default="127.0.0.1")
    port: int = _doc("port the Worker service binds to; 0 picks a free port", default=0)
    port_offset: int = _doc("added to port: several workers on one host share one setting (the systemd unit "
                            "passes --port-offset %i, so accelgen-worker@1 listens on port + 1)", default=0)
    advertise_host: str = _doc("host the scheduler dials back; empty = --host, or, when --host is a "
                               "wildcard, this machine's address on the route to the scheduler", default="")
    worker_id: str = _doc("stable name of this worker in the scheduler's registry (default hostname-pid)",
                          default_factory=_default_worker_id)
    executor: str = _doc("what runs the plans: 'sim' (cost model) or 'vllm'", default="sim")
    profile: str = _doc("device profile (shipped name or JSON path): the sim's cost model and KV size",
                        default=DEFAULT_PROFILE)
    time_scale: float = _doc("sim: sleep this multiple of the predicted iteration time (0 = no sleep, "
                             "for overhead benchmarks)", default=1.0)
    vocab_size: int = _doc("sim: vocabulary size sampled tokens are drawn from", default=50272)
    eos_token_id: int = _doc("sim: end-of-sequence token id reported to the scheduler", default=2)
    rpc_timeout_s: float = _doc("deadline of every call to the scheduler (register, heartbeat, deregister)",
                                default=2.0)
    register_backoff_max_s: float = _doc("longest wait between registration attempts while the scheduler "
                                         "is unreachable (backoff doubles from 0.1 s)", default=5.0)
    max_device_failures: int = _doc("executor (device) failures in a row after which the worker declares its "
                                    "device failed, deregisters and exits with status 4 (0 = never)", default=3)
    sim_fail_after: int = _doc("sim, fault injection: after this many successful iterations every iteration "
                               "raises a simulated device error (0 = never)", default=0)
    grace_s: float = _doc("when stopping, how long in-flight iterations may finish before the server stops",
                          default=5.0)
    drain_grace_s: float = _doc("on SIGTERM the worker drains: the scheduler routes it no new request and its "
                                "requests run to the end, for at most this many seconds (then the rest are "
                                "recomputed on other workers); it then deregisters and exits 0. 0 = no drain: "
                                "stop at once, as on SIGINT or a second signal", default=30.0)
    log_level: str = _doc("DEBUG, INFO, WARNING or ERROR", default="INFO")
    metrics_port: int | None = _doc("serve Prometheus metrics at http://HOST:PORT/metrics (HOST: --host; plus "
                                    "port_offset, like port; 0 = any free port; unset = no metrics server)",
                                    default=None)
    tls_dir: str | None = _doc("mutual TLS with the scheduler: a directory with ca.crt, worker.crt and worker.key "
                               "(`accelgen certs`); only the scheduler's certificate may send plans", default=None)
    insecure: bool = _doc("plaintext gRPC even where host or the scheduler is not loopback: anyone who reaches "
                          "the port can send plans and read prompts", default=False)
    model: str = _doc("vllm: model to serve, a Hugging Face id or a local model directory (required "
                      "with --executor vllm)", default="")
    dtype: str = _doc("vllm: weight and activation dtype: auto, float32, bfloat16 or float16", default="auto")
    max_model_len: int = _doc("vllm: longest sequence (prompt + output) served; 0 = the model's own limit",
                              default=0)
    kv_cache_space_gb: float = _doc("vllm: GiB of KV cache; 0 = vLLM's default (VLLM_CPU_KVCACHE_SPACE on "
                                    "CPU, gpu_memory_utilization on GPU)", default=0.0)
    seed: int = _doc("vllm: random seed of the engine (sampling without a per-request seed)", default=0)
    max_num_seqs: int = _doc("vllm: most requests in one iteration the runner is sized for; 0 = vLLM's "
                             "default", default=0)
    max_num_batched_tokens: int = _doc("vllm: most tokens in one iteration the runner is sized for; 0 = "
                                       "vLLM's default", default=0)
    num_blocks: int = _doc("vllm: use exactly this many KV blocks (vLLM's num_gpu_blocks_override); 0 = what "
                           "the KV memory holds", default=0)
    cpu_threads: int = _doc("vllm on a CPU: torch (OpenMP) threads of the model; 0 = what vllm serve gives its "
                            "CPU worker: every core this process may use but one, kept for the rest of the node, "
                            "at least 1 (an explicit OMP_NUM_THREADS is respected)", default=0)

    def __post_init__(self) -> None:
        if not self.scheduler or any(":" not in a for a in self.scheduler.split(",")):
            raise ValueError(f"scheduler must be host:port or a list ip:port,ip:port, got {self.scheduler!r}")
        channel_target(self.scheduler)  # a list must be IP literals of one family: ValueError says so
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.port_offset < 0 or (self.port_offset and not self.port) or self.listen_port > 65535:
            raise ValueError(f"port_offset must be >= 0, with a port (not 0), and port + port_offset at most "
                             f"65535, got port {self.port} and port_offset {self.port_offset}")
        self._check_transport()
        if self.metrics_port is not None and not 0 <= self.metrics_port + (self.port_offset if self.metrics_port
                                                                            else 0) <= 65535:
            raise ValueError(f"metrics_port must be in [0, 65535] (with port_offset added), got {self.metrics_port}")
        if not self.worker_id:
            raise ValueError("worker_id must not be empty")
        if self.time_scale < 0:
            raise ValueError(f"time_scale must be >= 0, got {self.time_scale}")
        if self.vocab_size <= 10:
            raise ValueError(f"vocab_size must be > 10, got {self.vocab_size}")
        if self.dtype not in _VLLM_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_VLLM_DTYPES)}, got {self.dtype!r}")
        for name in ("max_model_len", "kv_cache_space_gb", "max_num_seqs", "max_num_batched_tokens", "num_blocks",
                     "cpu_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = vLLM's default), got {getattr(self, name)}")
        for name in ("rpc_timeout_s", "register_backoff_max_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_device_failures", "sim_fail_after"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = never), got {getattr(self, name)}")
        if self.grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {self.grace_s}")
        if not 0 <= self.drain_grace_s <= 7 * 24 * 3600:
            raise ValueError(f"drain_grace_s must be in [0, 604800] seconds (0 = no drain), got {self.drain_grace_s}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"log_level must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")

    def _check_transport(self) -> None:
        binds = [("host", self.host)] + ([("advertise_host", self.advertise_host)] if self.advertise_host else [])
        check_transport("worker", self.tls_dir, self.insecure, binds=binds, dials=[("scheduler", self.scheduler)])
        if (is_loopback(self.host) and not self.advertise_host
                and not all(is_loopback(h) for h in address_hosts(self.scheduler))):
            raise ValueError(f"host {self.host} is loopback, so the scheduler at {self.scheduler} could not dial this "
                             "worker back: set host to this machine's address (or 0.0.0.0) or set advertise_host")

    @property
    def listen_port(self) -> int:
        """The port the Worker service binds: ``port + port_offset`` (0: a free one)."""
        return self.port + self.port_offset

    @functools.cached_property
    def transport(self) -> Transport:
        """This worker's certificates (read once) for its server and its channel to the scheduler."""
        return Transport.load("worker", self.tls_dir)

    def advertised_address(self, port: int) -> str:
        """The host:port the scheduler should dial for the Worker service bound at ``port``."""
        first_scheduler = self.scheduler.split(",")[0].strip()
        host = self.advertise_host or (_local_ip_towards(first_scheduler) if self.host in _WILDCARD_HOSTS else self.host)
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # IPv6 literal
        return f"{host}:{port}"

    @classmethod
    def from_env_and_args(cls, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> "WorkerConfig":
        """The old entry point, kept for its callers: ``LOADER.parse(argv, env)``."""
        return LOADER.parse(argv, env)


LOADER: ConfigLoader[WorkerConfig] = ConfigLoader(WorkerConfig, "worker")
