"""Scheduler service configuration: one typed object, from defaults < config file < env < flags.

Environment overrides are ``ACCELGEN_SCHEDULER_<FIELD>`` (upper case) and are read here and
nowhere else. The config file is TOML or JSON with the same field names; SLO classes go in a
``[classes.NAME]`` table with ``ttft_ms`` / ``tbt_ms`` or ``jct_ms``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tomllib
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from accelgen.core.policies.base import Policy
from accelgen.core.policies.registry import POLICY_NAMES, PolicySpec, make_policy
from accelgen.core.profile import DeviceProfile
from accelgen.core.slo import DEFAULT_CLASSES, SLO, SLOCatalog, SLOClass

ENV_PREFIX = "ACCELGEN_SCHEDULER_"


@dataclass
class SchedulerConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind the gRPC server to"})
    port: int = field(default=50051, metadata={"help": "gRPC port (0 = any free port)"})
    redis_url: str = field(default="redis://127.0.0.1:6379/0", metadata={"help": "Redis holding the durable state"})
    redis_prefix: str = field(default="accelgen:", metadata={"help": "key prefix in Redis (one per deployment)"})
    policy: str = field(default="accelgen", metadata={"help": f"scheduling policy: {', '.join(p for p in POLICY_NAMES if p != 'oracle')}"})
    profile: str = field(default="opt-13b_a100-80g", metadata={"help": "device profile used until a worker reports its own"})
    admission: bool = field(default=True, metadata={"help": "SLO-aware admission: refuse (RESOURCE_EXHAUSTED, with a retry hint) a request whose first token cannot be on time, where the policy offers it (accelgen; vllm+admission)"})
    max_queue: int = field(default=10000, metadata={"help": "most unfinished requests; more -> RESOURCE_EXHAUSTED"})
    max_num_seqs: int = field(default=256, metadata={"help": "most running requests per worker"})
    heartbeat_interval_s: float = field(default=1.0, metadata={"help": "how often workers heartbeat"})
    heartbeat_ttl_s: float = field(default=5.0, metadata={"help": "a worker silent this long is dropped and its requests re-queued"})
    lease_ttl_s: float = field(default=5.0, metadata={"help": "leader lease in Redis; a second scheduler waits for it"})
    worker_rpc_timeout_s: float = field(default=60.0, metadata={"help": "deadline of one ExecuteIteration call"})
    finished_ttl_s: int = field(default=3600, metadata={"help": "how long finished requests stay queryable"})
    grace_s: float = field(default=5.0, metadata={"help": "SIGTERM: time for in-flight calls to finish"})
    instance_id: str = field(default="", metadata={"help": "this scheduler's id (default: random)"})
    log_level: str = field(default="INFO", metadata={"help": "log level"})
    classes: dict[str, dict[str, float]] = field(default_factory=dict, metadata={
        "help": "application classes: {name: {ttft_ms, tbt_ms} or {jct_ms}}; default chat/code/summarization/batch"})

    def __post_init__(self) -> None:
        if not self.instance_id:
            self.instance_id = uuid.uuid4().hex[:12]
        try:
            spec = PolicySpec.parse(self.policy)
        except ValueError as exc:
            raise ValueError(f"policy: {exc}") from None
        if spec.name == "oracle":
            raise ValueError(f"policy must be one of {', '.join(p for p in POLICY_NAMES if p != 'oracle')} "
                             f"(the oracle needs output lengths and runs only in the simulator), got {self.policy!r}")
        if self.heartbeat_ttl_s <= self.heartbeat_interval_s:
            raise ValueError("heartbeat_ttl_s must exceed heartbeat_interval_s")
        self.catalog()  # validate classes early

    def make_policy(self, profile: DeviceProfile, catalog: SLOCatalog) -> Policy:
        """A fresh policy for one lane, with every policy setting of this config applied."""
        policy = make_policy(self.policy, profile, catalog)
        if not self.admission:
            policy.admission = None
        return policy

    def catalog(self) -> SLOCatalog:
        if not self.classes:
            return SLOCatalog(DEFAULT_CLASSES)
        out = []
        for name, spec in self.classes.items():
            try:
                slo = SLO(ttft_s=_ms(spec.get("ttft_ms")), tbt_s=_ms(spec.get("tbt_ms")), jct_s=_ms(spec.get("jct_ms")))
            except ValueError as exc:
                raise ValueError(f"class {name!r}: {exc}") from None
            out.append(SLOClass(name=name, slo=slo))
        return SLOCatalog(tuple(out))


def _ms(value: Any) -> float | None:
    return None if value in (None, 0) else float(value) / 1000.0


def _bool(raw: str) -> bool:
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def _coerce(f: dataclasses.Field, raw: str) -> Any:
    if f.type in ("bool", bool):
        return _bool(raw)
    if f.type in ("int", int):
        return int(raw)
    if f.type in ("float", float):
        return float(raw)
    if str(f.type).startswith("dict"):
        return json.loads(raw)
    return raw


def load_config(path: Path | None = None, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> SchedulerConfig:
    values: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        values.update(json.loads(text) if str(path).endswith(".json") else tomllib.loads(text))
    env = os.environ if env is None else env
    for f in fields(SchedulerConfig):
        raw = env.get(ENV_PREFIX + f.name.upper())
        if raw is not None:
            values[f.name] = _coerce(f, raw)
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    known = {f.name for f in fields(SchedulerConfig)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown scheduler config field(s): {', '.join(sorted(unknown))}")
    return SchedulerConfig(**values)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="TOML or JSON config file")
    for f in fields(SchedulerConfig):
        if f.name == "classes":
            continue
        kind = {"int": int, "float": float, "bool": _bool}.get(str(f.type), str)
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None,
                            help=f"{f.metadata.get('help', '')} (env {ENV_PREFIX}{f.name.upper()})")


def from_args(args: argparse.Namespace) -> SchedulerConfig:
    overrides = {f.name: getattr(args, f.name, None) for f in fields(SchedulerConfig) if f.name != "classes"}
    return load_config(args.config, overrides=overrides)
