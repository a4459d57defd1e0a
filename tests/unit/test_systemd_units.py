"""deploy/systemd: every unit passes ``systemd-analyze verify`` with no message at all, and
``systemd-analyze security --offline=yes`` rates the gateway and the scheduler "OK" or better
and the workers (which need the GPU devices) "MEDIUM" or better; the report is printed. Also the
settings the deployment relies on: a dedicated user, LimitNOFILE, per-instance worker ports, a
scheduler that never stops restarting while Redis is late.

Runs the installed ``systemd-analyze`` on copies of the units (ExecStart pointed at this
environment's ``accelgen``, so that ``verify`` finds an executable); skipped only where
``systemd-analyze`` is missing."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
INSTALLED = "/opt/accelgen/.venv/bin/accelgen"
ANALYZE = shutil.which("systemd-analyze")
# systemd's exposure levels, best first (src/analyze/analyze-security.c).
LEVELS = ("PERFECT", "SAFE", "OK", "MEDIUM", "EXPOSED", "UNSAFE", "DANGEROUS")
GOALS = {"accelgen-gateway.service": "OK", "accelgen-scheduler.service": "OK", "accelgen-worker@.service": "MEDIUM"}

needs_systemd = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def _settings(unit: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order (keys may repeat, as systemd allows)."""
    out, section = [], ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def _get(unit: Path, key: str) -> list[str]:
    return [value for _, k, value in _settings(unit) if k == key]


def _accelgen(tmp_path: Path) -> str:
    """This environment's ``accelgen`` (or a stand-in script where it is not installed as one)."""
    found = Path(sys.executable).with_name("accelgen")
    if found.exists():
        return str(found)
    stub = tmp_path / "accelgen"
    stub.write_text(f"#!/bin/sh\nexec {sys.executable} -m launcher.cli \"$@\"\n")
    stub.chmod(0o755)
    return str(stub)


@pytest.fixture
def copies(tmp_path: Path) -> dict[str, Path]:
    binary = _accelgen(tmp_path)
    units = tmp_path / "units"
    units.mkdir()
    out = {}
    for name in GOALS:
        text = (UNITS / name).read_text()
        assert INSTALLED in text, f"{name}: ExecStart should run {INSTALLED}"
        (units / name).write_text(text.replace(INSTALLED, binary))
        out[name] = units / name
    return out


def test_every_unit_is_there() -> None:
    assert sorted(p.name for p in UNITS.glob("*.service")) == sorted(GOALS)


@needs_systemd
def test_systemd_analyze_verify_finds_nothing_to_say(copies: dict[str, Path]) -> None:
    result = subprocess.run([ANALYZE, "verify", *map(str, copies.values())], capture_output=True, text=True,
                            timeout=120)
    print(result.stdout + result.stderr)
    # verify exits 0 on unknown keys and unparsable values (it only warns): any message about our
    # units fails the test.
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "accelgen" in line]
    assert result.returncode == 0 and not ours, "\n".join(ours) or result.stderr


@needs_systemd
@pytest.mark.parametrize("name", sorted(GOALS))
def test_systemd_analyze_security_level(copies: dict[str, Path], name: str) -> None:
    result = subprocess.run([ANALYZE, "security", "--offline=yes", "--no-pager", str(copies[name])],
                            capture_output=True, text=True, timeout=120)
    report = result.stdout + result.stderr
    print(report)
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+) ([A-Z]+)", report)
    assert match, report
    exposure, level = float(match.group(1)), match.group(2)
    print(f"{name}: {exposure} {level} (goal: {GOALS[name]} or better)")
    assert LEVELS.index(level) <= LEVELS.index(GOALS[name]), f"{name}: {exposure} {level}"


@pytest.mark.parametrize("name", sorted(GOALS))
def test_units_run_as_a_dedicated_user_with_a_file_limit_and_no_restart_on_config_errors(name: str) -> None:
    unit = UNITS / name
    assert _get(unit, "User") == ["accelgen"] and _get(unit, "Group") == ["accelgen"]
    assert int(_get(unit, "LimitNOFILE")[0]) >= 65536
    assert _get(unit, "Restart") == ["on-failure"] and _get(unit, "RestartPreventExitStatus") == ["2"]
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "CapabilityBoundingSet": ""}.items():
        assert _get(unit, key) == [value], f"{name}: {key}"
    assert "@system-service" in " ".join(_get(unit, "SystemCallFilter"))


def test_workers_listen_on_a_port_of_their_own_and_see_only_their_gpu() -> None:
    unit = UNITS / "accelgen-worker@.service"
    exec_start = _get(unit, "ExecStart")[0]
    assert "--port-offset %i" in exec_start and "--worker-id %H-%i" in exec_start
    assert "CUDA_VISIBLE_DEVICES=%i" in _get(unit, "Environment")
    assert _get(unit, "DevicePolicy") == ["closed"] and any("nvidia" in d for d in _get(unit, "DeviceAllow"))


def test_the_scheduler_keeps_restarting_while_redis_is_late() -> None:
    """The scheduler waits for Redis at start (not an exit); whatever else makes it exit (a
    deposed leader: 3) is restarted for ever, not stopped by a start limit."""
    unit = UNITS / "accelgen-scheduler.service"
    assert _get(unit, "StartLimitIntervalSec") == ["0"]
    assert "redis-server.service" in " ".join(_get(unit, "After"))
    assert "redis-server.service" in " ".join(_get(unit, "Wants"))
    assert _get(unit, "EnvironmentFile") == ["-/etc/accelgen/scheduler.env"]


def test_a_stopped_worker_has_time_to_drain() -> None:
    """`systemctl stop` sends SIGTERM, on which a worker drains for drain_grace_s, then stops
    (grace_s) and releases its model; systemd must not SIGKILL it first, which would leave its
    requests to be recomputed elsewhere."""
    from worker_service.config import WorkerConfig

    unit = UNITS / "accelgen-worker@.service"
    assert _get(unit, "KillSignal") == ["SIGTERM"]
    defaults = WorkerConfig(worker_id="w")
    assert int(_get(unit, "TimeoutStopSec")[0]) >= defaults.drain_grace_s + defaults.grace_s + 30
