"""The services' own settings on ``accelgen up``: a flag per setting, per-service config files, and
one config file with a table per service.

The flags are generated from each service's config dataclass (``ConfigLoader.settings``), so a
setting added to ``WorkerConfig`` is an ``accelgen up`` flag at once: ``--worker-dtype float32``
is the worker's ``--dtype float32``, ``--scheduler-max-queue 100`` the scheduler's
``--max-queue 100``, ``--gateway-key-burst 5`` the gateway's ``--key-burst 5``. Left out are the
settings the stack sets itself for each process (addresses, ports, ids, TLS) and those ``up`` has
as its own flags (``--executor``, ``--model``, ``--time-scale``, ``--policy``).

Files: ``--worker-config FILE`` (``--scheduler-config``, ``--gateway-config``) is handed to that
service as its ``--config``; ``--config FILE`` is one TOML (or JSON) file whose ``[worker]``,
``[scheduler]`` and ``[gateway]`` tables are each such a file. Every file is read here first, so
an unknown key or a value of the wrong type stops ``up`` before anything starts. Precedence is
each service's own: file < ``ACCELGEN_<SERVICE>_*`` environment < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any

from accelgen.common.config import ConfigError, ConfigLoader, Setting

SERVICES = ("worker", "scheduler", "gateway")

# Set by the stack for each process, or an `up` flag of its own.
STACK_SET: dict[str, frozenset[str]] = {
    "worker": frozenset({"scheduler", "worker_id", "host", "port", "port_offset", "advertise_host", "tls_dir",
                         "insecure", "executor", "model", "time_scale", "metrics_port"}),
    "scheduler": frozenset({"host", "port", "redis_url", "tls_dir", "insecure", "policy", "metrics_port"}),
    "gateway": frozenset({"scheduler_address", "host", "grpc_port", "http_port", "tls_dir", "insecure", "model"}),
}


def loaders() -> dict[str, ConfigLoader[Any]]:
    from gateway.config import LOADER as gateway
    from scheduler_service.config import LOADER as scheduler
    from worker_service.config import LOADER as worker

    return {"worker": worker, "scheduler": scheduler, "gateway": gateway}


def _dest(service: str, setting: Setting) -> str:
    return f"{service}__{setting.name}"


def passable(service: str, loader: ConfigLoader[Any]) -> list[Setting]:
    """The settings of ``service`` that ``up`` passes through."""
    return [s for s in loader.settings if s.name not in STACK_SET[service]]


def add_options(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--SERVICE-config`` and ``--SERVICE-<setting>`` for every passable setting."""
    parser.add_argument("--config", type=Path, default=None, metavar="PATH",
                        help="TOML (JSON if .json) with a [worker], [scheduler] and [gateway] table of settings")
    for service, loader in loaders().items():
        group = parser.add_argument_group(
            f"{service} settings", f"as `accelgen {service} --SETTING` (see `accelgen {service} --help`)")
        group.add_argument(f"--{service}-config", type=Path, default=None, metavar="PATH",
                           help=f"the {service}'s config file (its --config)")
        for s in passable(service, loader):
            extra: dict[str, Any] = {"action": "append"} if s.kind is list else {}
            if s.kind is bool:
                extra = {"nargs": "?", "const": "true"}
            group.add_argument(f"--{service}-{s.flag[2:]}", dest=_dest(service, s), default=None,
                               metavar={dict: "JSON", list: "STR"}.get(s.kind, s.type_name.upper()),
                               help=s.help.replace("%", "%%"), **extra)


@dataclasses.dataclass
class ServiceArgs:
    """What ``up`` adds to each service's command line."""

    worker: list[str] = dataclasses.field(default_factory=list)
    scheduler: list[str] = dataclasses.field(default_factory=list)
    gateway: list[str] = dataclasses.field(default_factory=list)


def service_args(args: argparse.Namespace, run_dir: Path) -> ServiceArgs:
    """Each service's ``--config PATH`` and flags from ``args``; raises ``ConfigError`` (one line)
    for a bad file or value. The tables of ``--config`` are written to ``run_dir`` as JSON, which
    must outlive the stack (a restarted service reads its file again)."""
    out = ServiceArgs()
    tables = _split(args.config) if args.config is not None else {}
    for service, loader in loaders().items():
        argv: list[str] = getattr(out, service)
        own = getattr(args, f"{service}_config")
        if own is not None and service in tables:
            raise ConfigError(f"the {service}'s settings are in both --config's [{service}] table and "
                              f"--{service}-config; give them in one place")
        path = own
        if service in tables:
            path = run_dir / f"{service}.json"
            path.write_text(json.dumps(tables[service]))
            path.chmod(0o600)  # may hold secrets (API keys, a Redis URL)
        if path is not None:
            where = f"{args.config} [{service}]" if service in tables else str(path)
            try:
                loader.read_file(path)
            except ConfigError as exc:
                raise ConfigError(str(exc).replace(str(path), where, 1)) from None
            argv += ["--config", str(path)]
        for s in passable(service, loader):
            value = getattr(args, _dest(service, s), None)
            if value is None:
                continue
            for raw in value if s.kind is list else [value]:
                try:
                    s.parse(raw)
                except ValueError:
                    raise ConfigError(f"--{service}-{s.flag[2:]} {raw!r} is not a valid {s.type_name}") from None
                argv += [s.flag, raw]
    return out


def _split(path: Path) -> dict[str, dict[str, Any]]:
    """``--config``'s tables by service."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}") from None
    unknown = sorted(set(data) - set(SERVICES))
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {', '.join(unknown)}; `accelgen up --config` takes the "
                          f"tables {', '.join(SERVICES)} (each as that service's own config file)")
    bad = [key for key, value in data.items() if not isinstance(value, dict)]
    if bad:
        raise ConfigError(f"{path}: {bad[0]} must be a table ([{bad[0]}]), not a value")
    return {service: dict(data[service]) for service in SERVICES if service in data}
