"""The services as a supervisor runs them: one process each, restarted when it dies.

``Supervised`` is a tiny systemd ``Restart=on-failure``: a thread waits on the process and, when
it exits non-zero or is killed by a signal, starts it again after ``restart_s`` (a clean exit 0
is left alone, as systemd does). The campaign kills and stops processes through it, so it
knows which deaths it caused. Redis runs with AOF on (``appendfsync always``) in a data
directory of its own, so a restarted Redis comes back with everything it acknowledged.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import redis

from launcher.stack import Proc, spawn


class Supervised:
    """One service under a restart loop. ``argv`` is rebuilt at each start (ports stay fixed)."""

    def __init__(self, name: str, argv: Callable[[], Sequence[str]], log_dir: Path, env: dict[str, str] | None = None,
                 restart_s: float = 0.5) -> None:
        self.name, self._argv, self.log_dir, self.env = name, argv, log_dir, env
        self.restart_s = restart_s
        self.proc: Proc | None = None
        self.starts = 0
        self.exit_codes: list[int] = []  # every exit seen, negative = killed by that signal
        self._stopping = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> "Supervised":
        self._spawn()
        self._thread = threading.Thread(target=self._watch, name=f"supervise-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _spawn(self) -> None:
        with self._lock:
            if self._stopping and self.proc is not None:
                return
            self.proc = spawn(self.name, list(self._argv()), self.log_dir, env=self.env)
            self.starts += 1

    def _watch(self) -> None:
        while not self._stopping:
            proc = self.proc
            assert proc is not None
            code = proc.popen.wait()
            if self._stopping:
                return
            self.exit_codes.append(code)
            if code == 0:  # Restart=on-failure: a clean stop stays stopped
                return
            time.sleep(self.restart_s)
            self._spawn()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.popen.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the current process's group (kill -9, SIGSTOP, SIGCONT)."""
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def wait_restarted(self, old_starts: int, timeout_s: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.starts > old_starts and self.alive():
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
        if self.proc is not None:
            self.signal(signal.SIGCONT)
            self.proc.stop(grace_s=5.0)


def redis_argv(port: int, data_dir: Path, replica_of: int | None = None) -> list[str]:
    """redis-server with AOF on, fsync on every write, its own data directory."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir), "--appendonly", "yes",
            "--appendfsync", "always", "--save", "", "--protected-mode", "no"]
    if replica_of is not None:
        argv += ["--replicaof", "127.0.0.1", str(replica_of)]
    return argv


def sentinel_argv(port: int, master_port: int, data_dir: Path, name: str = "accelgen") -> list[str]:
    """A sentinel watching ``master_port`` (quorum 1, failover in about a second)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    conf = data_dir / "sentinel.conf"
    if not conf.exists():  # sentinel rewrites its own file; a restart keeps what it learnt
        conf.write_text("\n".join([
            f"port {port}", "bind 127.0.0.1", "protected-mode no", f"dir {data_dir}",
            f"sentinel monitor {name} 127.0.0.1 {master_port} 1",
            f"sentinel down-after-milliseconds {name} 1000",
            f"sentinel failover-timeout {name} 5000",
            f"sentinel parallel-syncs {name} 1", ""]))
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    return [binary, str(conf), "--sentinel"]


def sentinel_master(sentinel_port: int, name: str = "accelgen") -> int | None:
    """The port of the master the sentinel names now (None if it cannot say)."""
    client = redis.Redis(port=sentinel_port, socket_timeout=1)
    try:
        host_port = client.execute_command("SENTINEL", "get-master-addr-by-name", name)
        return int(host_port[1]) if host_port else None
    except redis.exceptions.RedisError:
        return None
    finally:
        client.close()


def run_quietly(argv: Sequence[str], timeout_s: float = 10.0) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s)
