"""Start and stop the services as processes: ``accelgen up`` and the integration tests share this.

Every process is started in its own process group and stopped with SIGTERM first (so services
run their clean shutdown), then SIGKILL after a grace period. Readiness is the service's own
``grpc.health.v1`` answer, not a sleep. ``start_stack`` starts a stack and leaves it alone;
``Supervisor`` (what ``accelgen up`` runs) restarts whichever of its processes exits.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from accelgen.common.grpc_server import free_port
from accelgen.common.tls import Transport, open_sync_channel


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path | None = None
    argv: list[str] = field(default_factory=list)  # what ``spawn`` ran: ``respawn`` runs it again
    env: dict[str, str] | None = None
    log_dir: Path | None = None
    started_at: float = field(default_factory=time.monotonic)

    def respawn(self) -> "Proc":
        """The same command, environment and log file, as a new process (ports are in argv)."""
        if not self.argv:
            raise RuntimeError(f"{self.name} was not started by spawn(): nothing to restart")
        return spawn(self.name, self.argv, self.log_dir, self.env)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace_s: float = 10.0, sig: int = signal.SIGTERM) -> None:
        """``sig`` (SIGTERM: a worker drains first), then SIGKILL after ``grace_s``."""
        if not self.alive():
            return
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            return
        try:
            self.popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(timeout=10)


def spawn(name: str, argv: Sequence[str], log_dir: Path | None = None, env: dict[str, str] | None = None) -> Proc:
    log_path = None
    out = None
    if log_dir is not None:
        log_path = log_dir / f"{name}.log"
        out = open(log_path, "ab")  # appended to: a restarted service continues its log
    full_env = {**os.environ, **(env or {})}
    try:
        popen = subprocess.Popen(list(argv), stdout=out or subprocess.DEVNULL,
                                 stderr=subprocess.STDOUT if out else None, env=full_env, start_new_session=True)
    finally:
        if out is not None:
            out.close()  # the child has its own copy
    return Proc(name, popen, log_path, argv=list(argv), env=env, log_dir=log_dir)


def wait_healthy(address: str, service: str = "", timeout_s: float = 60.0, proc: Proc | None = None,
                 transport: Transport | None = None, peer_role: str = "scheduler") -> None:
    """Block until the server at ``address`` answers SERVING for ``service``. With mutual TLS the
    probe presents ``transport``'s certificate (health is open to any from the CA) and checks that
    the server is ``peer_role``."""
    deadline = time.monotonic() + timeout_s
    with open_sync_channel(address, transport, peer_role) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            if proc is not None and not proc.alive():
                raise RuntimeError(f"{proc.name} exited with code {proc.popen.returncode}" +
                                   (f"; see {proc.log_path}" if proc.log_path else ""))
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not healthy after {timeout_s:.0f} s")
            time.sleep(0.1)


def start_redis(port: int | None = None, workdir: Path | None = None, log_dir: Path | None = None,
                appendfsync: str | None = None, *, password: str | None = None,
                key_prefix: str | None = "accelgen:") -> tuple[Proc, str]:
    """A private redis-server on a free loopback port (tests, ``accelgen up``), and the URL to
    reach it: ``redis://accelgen:PASSWORD@127.0.0.1:PORT/0``.

    Like a deployment (``deploy/users.acl``): the default user is off, and the one user,
    ``accelgen``, has a random ``password`` (or the one given: restarting Redis on the same port
    for a scheduler that already has the URL) and the scheduler's ACL rules for keys under
    ``key_prefix`` (``scheduler_service.state.redis_acl``); ``key_prefix=None`` allows every key
    and command (tests and benchmarks that use several prefixes and inspect Redis directly). The
    users are in a 0600 file in ``workdir``, not on the command line, where any local user could
    read the password; ``Proc.respawn`` reuses the file, hence the password.

    No persistence unless ``appendfsync`` is given ("always", "everysec"): then AOF is on in
    ``workdir``, so the same command restarted (``Proc.respawn``) reloads what was acknowledged.
    """
    import secrets
    from urllib.parse import quote

    from scheduler_service.state.redis_acl import SCHEDULER_USER, user_line

    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found: apt-get install -y redis-server (make install does this)")
    if appendfsync not in (None, "always", "everysec", "no"):
        raise ValueError(f"appendfsync must be always, everysec or no, got {appendfsync!r}")
    port = port or free_port()
    workdir = workdir or Path(tempfile.mkdtemp(prefix="accelgen-redis-"))
    password = password or secrets.token_urlsafe(24)
    users = workdir / "redis-users.conf"
    fd = os.open(users, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # also when the file was there with other modes
        f.write("# Written by launcher.stack.start_redis: no default user, one ACL user.\n"
                f"user default off\n{user_line([password], key_prefix)}\n")
    aof = ["--appendonly", "yes", "--appendfsync", appendfsync] if appendfsync else ["--appendonly", "no"]
    proc = spawn("redis", [binary, str(users), "--port", str(port), "--bind", "127.0.0.1", "--save", "", *aof,
                           "--dir", str(workdir), "--protected-mode", "yes"], log_dir)
    if not wait_redis(port, proc=proc, username=SCHEDULER_USER, password=password):
        raise RuntimeError("redis-server did not start" + (f"; see {proc.log_path}" if proc.log_path else ""))
    return proc, f"redis://{SCHEDULER_USER}:{quote(password, safe='')}@127.0.0.1:{port}/0"


def wait_redis(port: int, timeout_s: float = 20.0, proc: Proc | None = None, *, username: str | None = None,
               password: str | None = None) -> bool:
    """Poll until the redis-server on ``port`` answers PING (as ``username``/``password`` where it
    has ACL users); False once ``timeout_s`` has passed or ``proc`` (the server, if ours) has
    exited. Refused connections and LOADING (an AOF being read after a restart) are waited through."""
    import redis

    client = redis.Redis(port=port, socket_timeout=1, username=username, password=password)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                if client.ping():
                    return True
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):  # incl. BusyLoadingError
                pass
            if (proc is not None and not proc.alive()) or time.monotonic() > deadline:
                return False
            time.sleep(0.05)
    finally:
        client.close()


@dataclass
class Stack:
    """The local stack: Redis, one scheduler, N workers, one gateway."""

    procs: list[Proc] = field(default_factory=list)
    redis_url: str = ""
    scheduler_address: str = ""
    gateway_address: str = ""
    http_port: int = 0
    log_dir: Path | None = None
    redis_dir: Path | None = None  # Redis's working directory (its AOF, when on)
    tls_dir: Path | None = None  # mutual TLS between the services (certificates from `accelgen certs`)
    metrics_urls: dict[str, str] = field(default_factory=dict)  # process name -> its Prometheus /metrics

    @property
    def probe(self) -> Transport | None:
        """How the launcher calls the services: as a gateway (GetServerInfo, health)."""
        return Transport.load("gateway", self.tls_dir) if self.tls_dir is not None else None

    def tls_args(self) -> list[str]:
        return ["--tls-dir", str(self.tls_dir)] if self.tls_dir is not None else []

    def stop(self) -> None:
        """Everything, gateway first. Workers get SIGINT: they stop at once instead of draining
        onto workers that are stopping too (``accelgen drain`` or SIGTERM takes one out alone)."""
        for p in reversed(self.procs):
            p.stop(sig=signal.SIGINT if p.name.startswith("worker") else signal.SIGTERM)

    def find(self, name: str) -> Proc:
        return next(p for p in self.procs if p.name == name)


class RunCertificates:
    """A CA and certificates made for one local run (``accelgen up``, the demo) in a fresh 0700
    directory, removed with ``remove()``: the run's internal traffic is mutual TLS like a
    deployment's, with nothing to set up."""

    def __init__(self) -> None:
        from accelgen.common.certs import CertsRequest, make_certs

        self.run_dir = Path(tempfile.mkdtemp(prefix="accelgen-run-"))
        self.tls_dir = self.run_dir / "tls"
        make_certs(CertsRequest(self.tls_dir, hosts=("127.0.0.1", "localhost")))

    def remove(self) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def start_scheduler_proc(stack: Stack, port: int, extra: Sequence[str] = (), name: str = "scheduler") -> Proc:
    # The Redis URL holds the password: in the environment, not on a command line every local user can read.
    proc = spawn(name, python_module("scheduler_service.main", "--port", str(port), *stack.tls_args(), *extra),
                 stack.log_dir, env={"ACCELGEN_SCHEDULER_REDIS_URL": stack.redis_url})
    wait_healthy(f"127.0.0.1:{port}", "accelgen.v1.Scheduler", proc=proc, transport=stack.probe)
    return proc


def start_worker_proc(stack: Stack, name: str, extra: Sequence[str] = ()) -> Proc:
    return spawn(name, python_module("worker_service.main", "--scheduler", stack.scheduler_address,
                                     "--worker-id", name, *stack.tls_args(), *extra), stack.log_dir)


def start_stack(workers: int = 1, executor: str = "sim", scheduler_args: Sequence[str] = (),
                worker_args: Sequence[str] = (), gateway_args: Sequence[str] = (), log_dir: Path | None = None,
                http_port: int | None = None, grpc_port: int | None = None, worker_timeout_s: float = 120.0,
                redis_appendfsync: str | None = None, tls_dir: Path | None = None,
                scheduler_metrics_port: int | None = None) -> Stack:
    """Redis, the scheduler, ``workers`` workers and the gateway, each waited for; nothing
    restarts them (wrap the stack in a ``Supervisor`` for that). ``redis_appendfsync`` turns
    Redis's AOF on (see ``start_redis``). ``tls_dir``: mutual TLS between the services with those
    certificates; None: plaintext (every service is on loopback)."""
    stack = Stack(log_dir=log_dir, tls_dir=tls_dir)
    try:
        stack.redis_dir = Path(tempfile.mkdtemp(prefix="accelgen-redis-"))
        redis_proc, stack.redis_url = start_redis(workdir=stack.redis_dir, log_dir=log_dir,
                                                  appendfsync=redis_appendfsync)
        stack.procs.append(redis_proc)
        sched_port = free_port()
        stack.scheduler_address = f"127.0.0.1:{sched_port}"
        # Prometheus /metrics of every service (scheduler_service/metrics.py): the scheduler's on
        # scheduler_metrics_port (None: a free one), each worker's on a free port, the gateway's
        # on its HTTP port.
        metrics_port = scheduler_metrics_port or free_port()
        stack.metrics_urls["scheduler"] = f"http://127.0.0.1:{metrics_port}/metrics"
        stack.procs.append(start_scheduler_proc(stack, sched_port, ["--metrics-port", str(metrics_port),
                                                                    *scheduler_args]))
        for i in range(workers):
            worker_metrics = free_port()
            stack.metrics_urls[f"worker-{i}"] = f"http://127.0.0.1:{worker_metrics}/metrics"
            stack.procs.append(start_worker_proc(stack, f"worker-{i}", ["--executor", executor, "--metrics-port",
                                                                        str(worker_metrics), *worker_args]))
        _wait_workers(stack.scheduler_address, workers, worker_timeout_s, stack)
        gport, stack.http_port = grpc_port or free_port(), http_port or free_port()
        stack.metrics_urls["gateway"] = f"http://127.0.0.1:{stack.http_port}/metrics"
        stack.gateway_address = f"127.0.0.1:{gport}"
        gw = spawn("gateway", python_module("gateway.main", "--scheduler-address", stack.scheduler_address, "--grpc-port",
                                            str(gport), "--http-port", str(stack.http_port), *stack.tls_args(),
                                            *gateway_args), log_dir)
        stack.procs.append(gw)
        wait_healthy(stack.gateway_address, "accelgen.v1.Gateway", proc=gw)
    except BaseException:
        stack.stop()
        raise
    return stack


def _wait_workers(address: str, n: int, timeout_s: float, stack: Stack) -> None:
    from accelgen.v1 import scheduler_pb2, scheduler_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with open_sync_channel(address, stack.probe, "scheduler") as ch:
        stub = scheduler_pb2_grpc.SchedulerStub(ch)
        while True:
            info = stub.GetServerInfo(scheduler_pb2.GetServerInfoRequest(), timeout=5)
            if info.live_workers >= n:
                return
            dead = [p for p in stack.procs if p.name.startswith("worker") and not p.alive()]
            if dead:
                raise RuntimeError(f"{dead[0].name} exited with code {dead[0].popen.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {info.live_workers} of {n} workers registered after {timeout_s:.0f} s")
            time.sleep(0.1)


# -- supervision (``accelgen up``) ---------------------------------------------------------------
EXIT_MEANINGS = {2: "configuration error", 3: "lost the leader lease", 4: "device failed"}


def describe_exit(code: int | None) -> str:
    """``status 4 (device failed)``, ``killed by SIGKILL``: what an exit status means here."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    meaning = EXIT_MEANINGS.get(code)
    return f"status {code}" + (f" ({meaning})" if meaning else "")


@dataclass
class Restart:
    """One restart the supervisor made (or gave up on: ``delay_s`` is None)."""

    name: str
    exit_code: int
    delay_s: float | None
    at: float  # time.monotonic() when the exit was seen


class Supervisor:
    """Keeps a ``Stack``'s processes running: one that exits is restarted with the same command
    (same ports, same Redis data directory) after an exponential backoff — ``backoff_initial_s``
    doubling to ``backoff_max_s``, back to the start once a process stayed up ``stable_after_s``
    — while the others keep running. Exit status 2 (a configuration error; systemd's
    ``RestartPreventExitStatus=2``) is not retried: the supervisor gives up and ``run`` returns.

    ``run(stop)`` supervises on the calling thread until ``stop`` is set (``accelgen up``);
    ``start()``/``stop()`` do the same on a thread (tests, the fault campaign). Stopping the
    stack itself is the caller's (``Stack.stop``), after supervision ended.
    """

    def __init__(self, stack: Stack, backoff_initial_s: float = 0.5, backoff_max_s: float = 30.0,
                 stable_after_s: float = 60.0, give_up_codes: Sequence[int] = (2,), poll_s: float = 0.1,
                 say: Callable[[str], None] | None = None) -> None:
        self.stack = stack
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.stable_after_s = stable_after_s
        self.give_up_codes = frozenset(give_up_codes)
        self.poll_s = poll_s
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.restarts: list[Restart] = []
        self.gave_up: Restart | None = None
        self._next_delay: dict[str, float] = {}
        self._due: dict[str, tuple[float, int]] = {}  # name -> (monotonic time to restart, exit code)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run(self, stop: threading.Event | None = None) -> int:
        """Supervise until ``stop`` (or ``self.stop()``); 0, or 1 after giving up on a service."""
        stop = stop or self._stop
        while not (stop.wait(self.poll_s) or self._stop.is_set()):
            if not self.check():
                return 1
        return 0

    def check(self, now: float | None = None) -> bool:
        """One round: notice exits, restart what is due. False once it gave up on a service."""
        now = time.monotonic() if now is None else now
        for i, proc in enumerate(self.stack.procs):
            if proc.alive():
                continue
            if proc.name not in self._due:
                code = proc.popen.returncode
                if code in self.give_up_codes:
                    self.gave_up = Restart(proc.name, code, None, now)
                    self.say(f"accelgen up: {proc.name} exited: {describe_exit(code)}; not restarting it")
                    return False
                _kill_leftovers(proc)
                delay = self._delay(proc, now)
                self._due[proc.name] = (now + delay, code)
                self.restarts.append(Restart(proc.name, code, delay, now))
                self.say(f"accelgen up: {proc.name} exited: {describe_exit(code)}; restarting in {delay:.1f} s")
            due, _ = self._due[proc.name]
            if now >= due and not self._stop.is_set():
                del self._due[proc.name]
                self.stack.procs[i] = proc.respawn()
                self.say(f"accelgen up: {proc.name} restarted (pid {self.stack.procs[i].popen.pid})")
        return True

    def _delay(self, proc: Proc, now: float) -> float:
        """This restart's wait: the initial one after a stable run, else double the last one."""
        if now - proc.started_at >= self.stable_after_s or proc.name not in self._next_delay:
            delay = self.backoff_initial_s
        else:
            delay = self._next_delay[proc.name]
        self._next_delay[proc.name] = min(delay * 2, self.backoff_max_s)
        return delay

    def start(self) -> "Supervisor":
        """Supervise on a daemon thread until ``stop()``."""
        self._thread = threading.Thread(target=self.run, name="accelgen-supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """End supervision (no restart after this returns); the processes keep running."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def _kill_leftovers(proc: Proc) -> None:
    """A service's own children (vLLM's engine processes) can outlive it when it is killed;
    they share its process group, which is killed before the service starts again."""
    try:
        os.killpg(proc.popen.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
