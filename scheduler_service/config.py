"""Scheduler service configuration: one typed object, read by the common loader
(``accelgen.common.config``): defaults < config file (``--config`` or ``ACCELGEN_SCHEDULER_CONFIG``)
< ``ACCELGEN_SCHEDULER_<FIELD>`` < ``--field-name``.

The config file is TOML or JSON with the same field names. SLO classes go in a
``[classes.NAME]`` table with ``ttft_ms`` / ``tbt_ms`` or ``jct_ms`` (JSON in the environment).
The policy's own settings go in ``[policy.accelgen]`` (and its ``budget``, ``admission_config``
and ``length_config`` sub-tables), each also ``ACCELGEN_SCHEDULER_POLICY_ACCELGEN_<KEY>`` and
``--policy-accelgen-<key>``; in a file that has them the policy's name is ``[policy] name``
(``policy = "NAME"`` at the top level, as before, where there is no ``[policy]`` table).
"""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass, field
from typing import Any

from accelgen.common.config import ConfigLoader
from accelgen.common.tls import Transport, address_hosts, check_transport, is_loopback
from accelgen.core.policies.accelgen_config import AccelGenConfig
from accelgen.core.policies.base import Policy
from accelgen.core.policies.registry import POLICY_NAMES, PolicySpec, make_policy
from accelgen.core.profile import DeviceProfile
from accelgen.core.slo import DEFAULT_CLASSES, SLO, SLOCatalog, SLOClass
from accelgen.wire.watch import WATCH_IDS_PER_GATEWAY_MESSAGE

ENV_PREFIX = "ACCELGEN_SCHEDULER_"
# Policies whose settings the service exposes: [policy.NAME] -> the SchedulerConfig field.
POLICY_SETTINGS = {"accelgen": "policy_accelgen"}
_CLASS_KEYS = {"ttft_ms", "tbt_ms", "jct_ms"}


@dataclass
class SchedulerConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind the gRPC server to"})
    port: int = field(default=50051, metadata={"help": "gRPC port (0 = any free port)"})
    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False, metadata={"help": "Redis holding the durable state: redis://USER:PASSWORD@HOST:6379/0 (an ACL user, deploy/users.acl), rediss://...?ssl_ca_certs=CA&ssl_certfile=CRT&ssl_keyfile=KEY for TLS, or redis+sentinel://...; give a password through the environment (a 0600 env file), not a flag: a command line is visible to every local user"})
    redis_prefix: str = field(default="accelgen:", metadata={"help": "key prefix in Redis (one per deployment)"})
    policy: str = field(default="accelgen", metadata={
        "help": f"scheduling policy: {', '.join(p for p in POLICY_NAMES if p != 'oracle')} (NAME@BUDGET, "
                "NAME+admission); in a file with a [policy] table: [policy] name",
        "file": ("policy", "policy.name")})
    profile: str = field(default="opt-13b_a100-80g", metadata={"help": "device profile used until a worker reports its own"})
    admission: bool = field(default=True, metadata={"help": "SLO-aware admission: refuse (RESOURCE_EXHAUSTED, with a retry hint) a request whose first token cannot be on time, where the policy offers it (accelgen; vllm+admission)"})
    max_queue: int = field(default=10000, metadata={"help": "most unfinished requests; more -> RESOURCE_EXHAUSTED"})
    max_num_seqs: int = field(default=256, metadata={"help": "most running requests per worker"})
    max_workers: int = field(default=64, metadata={"help": "most workers registered at once (each lane holds block accounting for up to 2^20 blocks); a new worker id beyond it -> RESOURCE_EXHAUSTED"})
    heartbeat_interval_s: float = field(default=1.0, metadata={"help": "how often workers heartbeat"})
    heartbeat_ttl_s: float = field(default=5.0, metadata={"help": "a worker silent this long is dropped and its requests re-queued"})
    lease_ttl_s: float = field(default=5.0, metadata={"help": "leader lease in Redis; a second scheduler waits for it"})
    lease_wait_s: float = field(default=0.0, metadata={"help": "how long a standby waits for the leader lease before giving up (exit 2); 0 = for ever"})
    worker_rpc_timeout_s: float = field(default=60.0, metadata={"help": "how long a lane waits for one iteration's result before it drops the worker"})
    pipeline: bool = field(default=True, metadata={"help": "decide and send plan k+1 while the worker runs plan k (vLLM's async scheduling), over one stream per worker; false: one plan at a time (for comparison)"})
    finished_ttl_s: int = field(default=3600, metadata={"help": "how long finished requests stay queryable"})
    redis_retry_s: float = field(default=2.0, metadata={"help": "how long one Redis command is retried on a fresh connection (restart, failover, LOADING, READONLY) before the caller sees UNAVAILABLE; iteration commits are retried for ever"})
    redis_min_replicas: int = field(default=0, metadata={"help": "replicas that must confirm every durable write (Redis WAIT, in the write's round trip): a Submit is acknowledged, and an iteration's tokens delivered, only once on that many replicas, so a Sentinel failover loses neither; too few in time -> Submit UNAVAILABLE, tokens wait"})
    redis_replica_timeout_ms: int = field(default=1000, metadata={"help": "how long a write waits for redis_min_replicas (1..4000 ms)"})
    grace_s: float = field(default=5.0, metadata={"help": "SIGTERM: time for in-flight calls to finish"})
    instance_id: str = field(default="", metadata={"help": "this scheduler's id (default: random)"})
    owner_gone_cancel_s: float = field(default=30.0, metadata={"help": "cancel the unfinished requests of a gateway that has had no WatchMany stream open this long (it died), unless another gateway watches them; 0 = never. After a scheduler restart every gateway gets this long again"})
    watch_max_ids_per_message: int = field(default=1024, metadata={"help": f"most request ids (watch + unwatch) one WatchMany message may carry; more -> INVALID_ARGUMENT (gateways send at most {WATCH_IDS_PER_GATEWAY_MESSAGE})"})
    watch_max_ids_per_stream: int = field(default=100_000, metadata={"help": "most requests one WatchMany stream may watch at once; each further one gets a RESOURCE_EXHAUSTED WatchError"})
    watch_store_lookups: int = field(default=8, metadata={"help": "most Redis lookups WatchMany streams make at once (all streams together), for requests with no channel here; the rest of the Redis pool stays for iteration commits and Submits"})
    max_message_bytes: int = field(default=16 << 20, metadata={"help": "largest gRPC message the scheduler accepts (a Submit of the longest prompt; a worker's profile JSON)"})
    log_level: str = field(default="INFO", metadata={"help": "log level"})
    metrics_port: int | None = field(default=None, metadata={"help": "serve Prometheus metrics at http://HOST:PORT/metrics (HOST: the gRPC host; 0 = any free port; unset = no metrics server); deploy/README.md lists them"})
    slo_tbt_tolerance: float = field(default=0.05, metadata={"help": "metrics: fraction of late gaps a finished request may have and still count as meeting its TBT SLO (the rule of accelgen load and the gateway's slo_tbt_tolerance)"})
    tls_dir: str | None = field(default=None, metadata={"help": "mutual TLS with gateways and workers: a directory with ca.crt, scheduler.crt and scheduler.key (`accelgen certs`); callers need a certificate from that CA with the role each call is for"})
    insecure: bool = field(default=False, metadata={"help": "plaintext gRPC even where host is not loopback (and to workers that are not): anyone who reaches the port can submit, read and register workers"})
    classes: dict[str, dict[str, float]] = field(default_factory=dict, metadata={
        "help": "application classes: {name: {ttft_ms, tbt_ms} or {jct_ms}}; default chat/code/summarization/batch"})
    policy_accelgen: AccelGenConfig = field(default_factory=AccelGenConfig, metadata={
        "table": "policy.accelgen",
        "help": "settings of the accelgen policy (used when policy is accelgen or accelgen+admission)"})

    def __post_init__(self) -> None:
        if not self.instance_id:
            self.instance_id = uuid.uuid4().hex[:12]
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        try:
            spec = PolicySpec.parse(self.policy)
        except ValueError as exc:
            raise ValueError(f"policy: {exc}") from None
        if spec.name == "oracle":
            raise ValueError(f"policy must be one of {', '.join(p for p in POLICY_NAMES if p != 'oracle')} "
                             f"(the oracle needs output lengths and runs only in the simulator), got {self.policy!r}")
        if not 0 <= self.owner_gone_cancel_s < float("inf"):
            raise ValueError(f"owner_gone_cancel_s must be >= 0 (0 = never), got {self.owner_gone_cancel_s}")
        if not 0 < self.redis_retry_s <= 60 or self.redis_min_replicas < 0 or not 0 < self.redis_replica_timeout_ms <= 4000:
            raise ValueError(f"redis_retry_s must be in (0, 60], redis_min_replicas >= 0 and redis_replica_timeout_ms "
                             f"in [1, 4000] (below the 5 s socket timeout), got {self.redis_retry_s}, "
                             f"{self.redis_min_replicas}, {self.redis_replica_timeout_ms}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in [0, 65535] (0 = any free port), got {self.metrics_port}")
        if not 0 <= self.slo_tbt_tolerance < 1:
            raise ValueError(f"slo_tbt_tolerance must be in [0, 1), got {self.slo_tbt_tolerance}")
        if self.max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {self.max_workers}")
        if self.heartbeat_ttl_s <= self.heartbeat_interval_s:
            raise ValueError("heartbeat_ttl_s must exceed heartbeat_interval_s")
        from scheduler_service.state.redis_conn import check_url  # imports redis-py: not at module import

        check_url(self.redis_url)  # TLS options on a plaintext URL, unreadable files: the message hides passwords
        if (self.watch_max_ids_per_message < WATCH_IDS_PER_GATEWAY_MESSAGE or self.watch_max_ids_per_stream < 1
                or self.watch_store_lookups < 1 or self.max_message_bytes < 1 << 20):
            raise ValueError(f"watch_max_ids_per_message must be >= {WATCH_IDS_PER_GATEWAY_MESSAGE} (what a gateway "
                             f"sends), watch_max_ids_per_stream and watch_store_lookups >= 1 and max_message_bytes "
                             f">= 1 MiB, got {self.watch_max_ids_per_message}, {self.watch_max_ids_per_stream}, "
                             f"{self.watch_store_lookups}, {self.max_message_bytes}")
        check_transport("scheduler", self.tls_dir, self.insecure, binds=[("host", self.host)], dials=[])
        self.catalog()  # validate classes early

    @functools.cached_property
    def transport(self) -> Transport:
        """This scheduler's certificates (read once) for its server and its channels to workers."""
        return Transport.load("scheduler", self.tls_dir)

    def plaintext_to(self, address: str) -> bool:
        """Whether dialling a worker at ``address`` would break the plaintext rule (no tls_dir,
        no insecure, and not loopback): such a registration is refused."""
        return not self.tls_dir and not self.insecure and not all(is_loopback(h) for h in address_hosts(address))

    def make_policy(self, profile: DeviceProfile, catalog: SLOCatalog) -> Policy:
        """A fresh policy for one lane, with every policy setting of this config applied."""
        spec = PolicySpec.parse(self.policy)
        settings = getattr(self, POLICY_SETTINGS[spec.name]) if spec.name in POLICY_SETTINGS else None
        policy = make_policy(self.policy, profile, catalog, config=settings)
        if not self.admission:
            policy.admission = None
        return policy

    def catalog(self) -> SLOCatalog:
        if not self.classes:
            return SLOCatalog(DEFAULT_CLASSES)
        out = []
        for name, spec in self.classes.items():
            unknown = sorted(set(spec) - _CLASS_KEYS) if isinstance(spec, dict) else None
            if unknown is None or unknown:
                raise ValueError(f"class {name!r}: expected a table of {', '.join(sorted(_CLASS_KEYS))}"
                                 + (f", got unknown key(s) {', '.join(unknown)}" if unknown else f", got {spec!r}"))
            try:
                slo = SLO(ttft_s=_ms(spec.get("ttft_ms")), tbt_s=_ms(spec.get("tbt_ms")), jct_s=_ms(spec.get("jct_ms")))
            except ValueError as exc:
                raise ValueError(f"class {name!r}: {exc}") from None
            out.append(SLOClass(name=name, slo=slo))
        return SLOCatalog(tuple(out))


def _ms(value: Any) -> float | None:
    return None if value in (None, 0) else float(value) / 1000.0


def _check_policy_tables(data: dict[str, Any]) -> None:
    """A [policy.X] table for a policy without settings, or no policy at all, said plainly."""
    table = data.get("policy")
    if not isinstance(table, dict):
        return
    for key in table:
        if key == "name" or key in POLICY_SETTINGS:
            continue
        tables = ", ".join(f"[policy.{name}]" for name in POLICY_SETTINGS)
        if key in POLICY_NAMES:
            raise ValueError(f"[policy.{key}]: the {key} policy has no settings (only {tables} can be set)")
        raise ValueError(f"[policy.{key}]: unknown policy {key!r}; [policy] holds name and {tables}")


LOADER: ConfigLoader[SchedulerConfig] = ConfigLoader(SchedulerConfig, "scheduler", check_file=_check_policy_tables)
