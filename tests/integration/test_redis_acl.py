"""The scheduler against a Redis with a password and an ACL user (``launcher.stack.start_redis``,
``deploy/redis.conf`` + ``deploy/users.acl``), and over TLS (``rediss://``): the store works as
the ``accelgen`` user; a wrong password, no credentials (the default user is off) and an
untrusted certificate are refused at once with Redis's reason (not retried until a timeout);
keys outside the prefix and admin commands are refused; no password reaches a log."""

from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
import redis.exceptions as rx

from accelgen.common.grpc_server import free_port
from accelgen.core.request import Request, RequestStatus, SamplingParams
from accelgen.core.slo import SLO
from accelgen.core.worker_info import WorkerInfo
from launcher.stack import Proc, python_module, spawn, start_redis, wait_healthy
from scheduler_service.state import redis_acl
from scheduler_service.state.redis_conn import durability, is_transient, redact_url
from scheduler_service.state.store import IterationChanges, RedisStore

pytestmark = pytest.mark.integration

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
REDIS = shutil.which("redis-server") or "redis-server"


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = start_redis(workdir=tmp_path_factory.mktemp("redis"))  # the accelgen user, ~accelgen:*
    yield url
    proc.stop()


def _with_password(url: str, user: str | None, password: str | None) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    auth = f"{user or ''}:{password}@" if password is not None else ""
    return urlunsplit((parts.scheme, auth + host, parts.path, parts.query, ""))


def _request(rid: str) -> Request:
    return Request(request_id=rid, prompt_token_ids=[5, 6, 7], sampling=SamplingParams(max_tokens=4),
                   slo=SLO(ttft_s=1.0, tbt_s=0.1), app_class="chat", arrival_s=time.time())


async def _exercise(store: RedisStore) -> None:
    """Every kind of write and read the scheduler makes, as the ACL user."""
    fence = await store.acquire_lease("sched-acl", 5000)  # script: GET, INCR, TIME, SET PX
    assert fence is not None and await store.renew_lease(5000)
    await store.add_request(_request("r1"), "w0")  # script: DEL, HSET, ZADD
    await store.commit_iteration(IterationChanges(  # script: STRLEN, APPEND, HSET
        worker_id="w0", tokens={"r1": ([11, 12], [1.0, 2.0])}, offsets={"r1": 0},
        status={"r1": (RequestStatus.RUNNING, "")}))
    rec = await store.load_request("r1")  # pipeline: HGETALL, GET
    assert rec is not None and rec.request.output_token_ids == [11, 12]
    await store.commit_iteration(IterationChanges(  # finished: ZREM, EXPIRE
        worker_id="w0", tokens={"r1": ([13], [3.0])}, offsets={"r1": 2},
        status={"r1": (RequestStatus.FINISHED, "length")}, finished=["r1"]))
    await store.add_request(_request("r2"), "w0")
    await store.redis.hset(store.p + "req:r2", "slo", "{not json")  # malformed: quarantined (RENAME)
    assert await store.load_live() == []
    info = WorkerInfo(model="m", executor="sim", block_size=16, num_blocks=100, max_model_len=2048,
                      profile_json="", eos_token_id=2, vocab_size=50272, max_num_seqs=8)
    await store.register_worker("w0", "127.0.0.1:7001", info, ttl_s=30)  # MULTI/EXEC: HSET, SET PX
    await store.heartbeat("w0", ttl_s=30)
    assert await store.live_workers() == {"w0": ("127.0.0.1:7001", info)}  # HGETALL, EXISTS
    await store.remove_worker("w0")  # HDEL, DEL
    await store.write_owners({"r1": "gw1"}, set())
    await store.write_owners({}, {"r1"})
    assert await store.load_owners() == {}
    await store.release_lease()


def test_the_scheduler_store_works_as_the_acl_user(acl_redis: str) -> None:
    assert urlsplit(acl_redis).username == redis_acl.SCHEDULER_USER and urlsplit(acl_redis).password

    async def scenario() -> None:
        store = RedisStore(acl_redis, prefix="accelgen:")
        try:
            await _exercise(store)
            with pytest.raises(rx.NoPermissionError, match="script"):  # not the scheduler's to run
                await store.redis.execute_command("SCRIPT", "FLUSH")
            # A fresh client after a Redis restart: NOSCRIPT -> SCRIPT LOAD (or EVAL), allowed.
            await store.redis.execute_command("SCRIPT", "EXISTS", "0" * 40)
            # CONFIG GET is refused: the durability line still knows the AOF setting, from INFO.
            report = await durability(store.redis, sentinel=False, min_replicas=0)
            assert report["appendonly"] == "no" and report["appendfsync"] == "unknown"
            assert "config|get" in report.get("config_get", ""), report
        finally:
            await store.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("prefix", ["other:", "accelgenx:"])
def test_keys_outside_the_prefix_are_refused(acl_redis: str, prefix: str) -> None:
    async def scenario() -> None:
        store = RedisStore(acl_redis, prefix=prefix, retry_s=5.0)
        started = time.monotonic()
        try:
            with pytest.raises(rx.ResponseError) as refused:  # inside a script: Redis names the keys
                await store.acquire_lease("sched-x", 5000)
            assert "can't access" in str(refused.value) or "no permissions" in str(refused.value)
            assert not is_transient(refused.value)
            with pytest.raises(rx.NoPermissionError, match="keys"):
                await store.redis.hgetall(prefix + "workers")
        finally:
            await store.close()
        assert time.monotonic() - started < 2.0, "a permission error must not be retried"

    asyncio.run(scenario())


@pytest.mark.parametrize("command", [("KEYS", "*"), ("FLUSHALL",), ("CONFIG", "SET", "appendonly", "yes"),
                                     ("ACL", "LIST"), ("SCAN", "0"), ("RANDOMKEY",), ("CLIENT", "KILL", "TYPE", "normal"), ("SWAPDB", "0", "1"),
                                     ("REPLICAOF", "127.0.0.1", "1"), ("SHUTDOWN",), ("PUBLISH", "c", "x"),
                                     ("SORT", "accelgen:x"), ("MIGRATE", "127.0.0.1", "1", "accelgen:x", "0", "10")])
def test_admin_and_listing_commands_are_refused(acl_redis: str, command: tuple[str, ...]) -> None:
    client = redis.Redis.from_url(acl_redis, socket_timeout=2)
    try:
        with pytest.raises(rx.NoPermissionError):
            client.execute_command(*command)
    finally:
        client.close()


@pytest.mark.parametrize("credentials", ["wrong password", "no credentials", "default user", "unknown user"])
def test_bad_credentials_are_refused_at_once_with_redis_reason(acl_redis: str, credentials: str) -> None:
    user, password = {"wrong password": (redis_acl.SCHEDULER_USER, "not-the-password"),
                      "no credentials": (None, None), "default user": ("default", "anything"),
                      "unknown user": ("someone", urlsplit(acl_redis).password)}[credentials]
    url = _with_password(acl_redis, user, password)

    error, took = _first_lease_refused(url, rx.AuthenticationError, retry_s=10.0)
    assert took < 2.0, "refused credentials must not be retried for retry_s"
    assert not is_transient(error)
    assert ("Authentication required" in str(error) if password is None
            else "invalid username-password pair or user is disabled" in str(error)), error


def test_a_scheduler_with_a_wrong_password_exits_2_saying_why_and_shows_no_password(
        acl_redis: str, tmp_path: Path) -> None:
    good = urlsplit(acl_redis).password
    assert good is not None
    wrong = "wrong-" + good[::-1]
    port = free_port()
    proc = spawn("sched-badpw", python_module("scheduler_service.main", "--port", str(port)), tmp_path,
                 env={"ACCELGEN_SCHEDULER_REDIS_URL": _with_password(acl_redis, "accelgen", wrong)})
    try:
        proc.popen.wait(timeout=30)
    finally:
        proc.kill()
    log = (tmp_path / "sched-badpw.log").read_text()
    assert proc.popen.returncode == 2, log
    assert "scheduler_cannot_start" in log and "invalid username-password pair" in log
    assert wrong not in log and good not in log


def test_a_scheduler_serves_as_the_acl_user_and_logs_no_password(acl_redis: str, tmp_path: Path) -> None:
    password = urlsplit(acl_redis).password
    assert password is not None
    port = free_port()
    proc: Proc = spawn("sched-acl", python_module("scheduler_service.main", "--port", str(port),
                                                  "--redis-prefix", "accelgen:", "--instance-id", "sched-acl"),
                       tmp_path, env={"ACCELGEN_SCHEDULER_REDIS_URL": acl_redis})
    try:
        wait_healthy(f"127.0.0.1:{port}", "accelgen.v1.Scheduler", timeout_s=30, proc=proc)
    finally:
        proc.stop()
    log = (tmp_path / "sched-acl.log").read_text()
    assert "scheduler_serving" in log and "durability" in log
    assert password not in log
    assert redact_url(acl_redis) in log  # the URL is logged, redacted


# -- deploy/redis.conf + deploy/users.acl --------------------------------------------------------
def test_deploy_users_acl_gives_the_scheduler_exactly_the_rules_it_needs() -> None:
    text = (DEPLOY / "users.acl").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith(f"user {redis_acl.SCHEDULER_USER} "))
    assert line.endswith(redis_acl.scheduler_rules("accelgen:")), line
    assert "user default off" in text.splitlines()
    assert "aclfile /etc/redis/users.acl" in (DEPLOY / "redis.conf").read_text()


def test_the_deployed_redis_conf_with_its_acl_file_serves_the_scheduler(tmp_path: Path) -> None:
    """deploy/redis.conf as shipped (its aclfile, port and dir moved to the test's), with
    users.acl's placeholder replaced by a password's SHA-256, the way the README says."""
    password = "deploy-test-password-0123456789"
    acl = (DEPLOY / "users.acl").read_text()
    placeholders = re.findall(r"#REPLACE_WITH_SHA256_OF_[A-Z_]+", acl)
    assert placeholders, "users.acl must not ship a usable password"
    for placeholder in set(placeholders):
        acl = acl.replace(placeholder, "#" + hashlib.sha256(password.encode()).hexdigest())
    (tmp_path / "users.acl").write_text(acl)
    port = free_port()
    proc = spawn("redis-deploy", [REDIS, str(DEPLOY / "redis.conf"), "--port", str(port), "--dir", str(tmp_path),
                                  "--aclfile", str(tmp_path / "users.acl"), "--appendonly", "no"], tmp_path)
    url = f"redis://accelgen:{password}@127.0.0.1:{port}/0"
    try:
        from launcher.stack import wait_redis

        assert wait_redis(port, proc=proc, username="accelgen", password=password), \
            (tmp_path / "redis-deploy.log").read_text()

        _exercise_at(url)

        async def scenario() -> None:
            anonymous = RedisStore(_with_password(url, None, None), prefix="accelgen:")
            try:
                with pytest.raises(rx.AuthenticationError):
                    await anonymous.acquire_lease("x", 5000)
            finally:
                await anonymous.close()

        asyncio.run(scenario())
    finally:
        proc.stop()


def _exercise_at(url: str) -> None:
    """``_exercise`` on a fresh store at ``url``."""

    async def scenario() -> None:
        store = RedisStore(url, prefix="accelgen:")
        try:
            await _exercise(store)
        finally:
            await store.close()

    asyncio.run(scenario())


def _first_lease_refused(url: str, expected: type[Exception], retry_s: float) -> tuple[Exception, float]:
    """The error a fresh store's first command gets from ``url`` (it must be ``expected``), and
    how long it took to come back."""

    async def scenario() -> tuple[Exception, float]:
        store = RedisStore(url, prefix="accelgen:", retry_s=retry_s)
        started = time.monotonic()
        try:
            with pytest.raises(expected) as refused:
                await store.acquire_lease("sched-x", 5000)
        finally:
            await store.close()
        return refused.value, time.monotonic() - started

    return asyncio.run(scenario())


# -- TLS -------------------------------------------------------------------------------------------
def _certs(out: Path) -> dict[str, Path]:
    """A CA, Redis's server cert (127.0.0.1), a client cert (the scheduler's); and a second CA's
    client cert. Made by ``accelgen certs`` as a deployment would: any certificate of the CA with
    the address in it serves for Redis's side."""
    import shutil

    from accelgen.common.certs import CertsRequest, make_certs

    good, rogue = out / "good", out / "rogue-dir"
    make_certs(CertsRequest(good, hosts=("127.0.0.1", "localhost")))
    make_certs(CertsRequest(rogue, hosts=("127.0.0.1", "localhost")))
    for stem, (source, role) in {"ca": (good, "ca"), "rogue-ca": (rogue, "ca"), "redis": (good, "gateway"),
                                 "client": (good, "scheduler"), "rogue": (rogue, "scheduler")}.items():
        shutil.copy(source / f"{role}.crt", out / f"{stem}.crt")
        if role != "ca":
            shutil.copy(source / f"{role}.key", out / f"{stem}.key")
            (out / f"{stem}.key").chmod(0o600)
    return {stem: out / f"{stem}.crt" for stem in ("ca", "rogue-ca", "redis", "client", "rogue")}


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A redis-server with only a TLS port (client certificates required) and the ACL user."""
    work = tmp_path_factory.mktemp("redis-tls")
    certs = work / "certs"
    certs.mkdir()
    _certs(certs)
    # start_redis's users file and password, on a plaintext port we then close: start_redis waits
    # on plaintext PING, so start the TLS server ourselves with the same users file.
    plain, url = start_redis(workdir=work)
    plain.stop()
    port = free_port()
    proc = spawn("redis-tls", [REDIS, str(work / "redis-users.conf"), "--port", "0", "--tls-port", str(port),
                               "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(work),
                               "--tls-cert-file", str(certs / "redis.crt"), "--tls-key-file", str(certs / "redis.key"),
                               "--tls-ca-cert-file", str(certs / "ca.crt"), "--tls-auth-clients", "yes"], work)
    password = urlsplit(url).password
    tls_url = (f"rediss://accelgen:{password}@127.0.0.1:{port}/0?ssl_ca_certs={certs / 'ca.crt'}"
               f"&ssl_certfile={certs / 'client.crt'}&ssl_keyfile={certs / 'client.key'}")
    deadline = time.monotonic() + 20
    while True:
        client = redis.Redis.from_url(tls_url, socket_timeout=1)
        try:
            if client.ping():
                break
        except rx.ConnectionError:
            if not proc.alive() or time.monotonic() > deadline:
                raise RuntimeError((work / "redis-tls.log").read_text())
            time.sleep(0.1)
        finally:
            client.close()
    yield tls_url, certs
    proc.stop()


def test_the_scheduler_store_works_over_tls_with_a_client_certificate(tls_redis: tuple[str, Path]) -> None:
    _exercise_at(tls_redis[0])


@pytest.mark.parametrize("case", ["no client certificate", "client certificate of another CA",
                                  "server not trusted", "plaintext to the TLS port"])
def test_tls_refusals_are_immediate_and_not_retried(tls_redis: tuple[str, Path], case: str) -> None:
    url, certs = tls_redis
    base = url.partition("?")[0]
    bad = {"no client certificate": f"{base}?ssl_ca_certs={certs / 'ca.crt'}",
           "client certificate of another CA": f"{base}?ssl_ca_certs={certs / 'ca.crt'}"
                                               f"&ssl_certfile={certs / 'rogue.crt'}&ssl_keyfile={certs / 'rogue.key'}",
           "server not trusted": f"{base}?ssl_ca_certs={certs / 'rogue-ca.crt'}"
                                 f"&ssl_certfile={certs / 'client.crt'}&ssl_keyfile={certs / 'client.key'}",
           "plaintext to the TLS port": "redis" + base[len("rediss"):]}[case]

    error, took = _first_lease_refused(bad, rx.ConnectionError, retry_s=3.0)
    print(f"\n{case}: {error} (after {took:.2f} s, transient={is_transient(error)})")
    if case == "plaintext to the TLS port":
        # Redis just closes the connection: indistinguishable from a restart, so retried.
        assert is_transient(error) and took >= 2.5
    else:  # a certificate refused: the configuration, reported at once
        assert not is_transient(error) and took < 2.0
        assert re.search(r"CERTIFICATE_REQUIRED|UNKNOWN_CA|CERTIFICATE_VERIFY_FAILED", str(error))


def test_tls_options_on_a_plaintext_url_are_a_config_error_that_hides_the_password(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("not used")
    proc = spawn("sched-badurl", python_module("scheduler_service.main", "--port", str(free_port())), tmp_path,
                 env={"ACCELGEN_SCHEDULER_REDIS_URL": f"redis://accelgen:hunter2-secret@127.0.0.1:1/0?ssl_ca_certs={ca}"})
    proc.popen.wait(timeout=30)
    log = (tmp_path / "sched-badurl.log").read_text()
    assert proc.popen.returncode == 2 and "need a TLS URL: rediss://" in log, log
    assert "hunter2-secret" not in log and "accelgen:***@127.0.0.1" in log


def test_through_sentinels_with_passwords_over_tls(tls_redis: tuple[str, Path], tmp_path: Path) -> None:
    """sentinel.conf's authentication and TLS as documented: the sentinel logs in to the master as
    the `sentinel` ACL user, asks clients for requirepass, serves TLS only; the scheduler's
    redis+sentinel:// URL carries both passwords and ssl=true with its files."""
    url, certs = tls_redis
    parts = urlsplit(url)
    sentinel_user_pw, sentinel_pw = "sentinel-user-password-123", "sentinel-client-password-456"
    # A master with the accelgen and sentinel users (as redis.conf's comment lists them), TLS only.
    users = tmp_path / "users.conf"
    users.write_text("user default off\n" + redis_acl.user_line([parts.password or ""], "accelgen:") + "\n"
                     f"user sentinel on >{sentinel_user_pw} resetkeys allchannels -@all +multi +slaveof +ping +exec "
                     "+subscribe +config|rewrite +role +publish +info +client|setname +client|kill +script|kill\n")
    tls_args = ["--tls-cert-file", str(certs / "redis.crt"), "--tls-key-file", str(certs / "redis.key"),
                "--tls-ca-cert-file", str(certs / "ca.crt"), "--tls-replication", "yes"]
    master_port, sentinel_port = free_port(), free_port()
    master = spawn("redis-master", [REDIS, str(users), "--port", "0", "--tls-port", str(master_port), "--bind",
                                    "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path),
                                    *tls_args], tmp_path)
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port 0\ntls-port {sentinel_port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                    f"tls-cert-file {certs / 'redis.crt'}\ntls-key-file {certs / 'redis.key'}\n"
                    f"tls-ca-cert-file {certs / 'ca.crt'}\ntls-replication yes\n"
                    f"requirepass {sentinel_pw}\nsentinel sentinel-pass {sentinel_pw}\n"
                    f"sentinel monitor accelgen 127.0.0.1 {master_port} 1\n"
                    f"sentinel auth-user accelgen sentinel\nsentinel auth-pass accelgen {sentinel_user_pw}\n"
                    "sentinel down-after-milliseconds accelgen 2000\n")
    conf.chmod(0o600)
    sentinel = spawn("sentinel", [REDIS, str(conf), "--sentinel"], tmp_path)
    started = time.monotonic()
    tls_query = f"ssl_ca_certs={certs / 'ca.crt'}&ssl_certfile={certs / 'client.crt'}&ssl_keyfile={certs / 'client.key'}"
    sentinel_url = (f"redis+sentinel://accelgen:{parts.password}@127.0.0.1:{sentinel_port}/accelgen/0"
                    f"?sentinel_password={sentinel_pw}&ssl=true&{tls_query}")

    async def scenario() -> None:
        deadline = time.monotonic() + 20
        while True:  # the sentinel up and the master known to it (it logs in as `sentinel`)
            store = RedisStore(sentinel_url, prefix="accelgen:")
            try:
                await _exercise(store)
                return
            except (rx.ConnectionError, rx.TimeoutError) as exc:
                if time.monotonic() > deadline or not sentinel.alive() or not master.alive():
                    raise AssertionError(f"{exc}\n{(tmp_path / 'sentinel.log').read_text()}") from exc
                await asyncio.sleep(0.2)
            finally:
                await store.close()

    try:
        asyncio.run(scenario())
        # Past down-after-milliseconds the sentinel still sees the master up: its own login
        # (auth-user/auth-pass, the `sentinel` ACL user) works over TLS; a refused one is s_down.
        time.sleep(max(0.0, started + 3.0 - time.monotonic()))
        check = redis.Redis(port=sentinel_port, password=sentinel_pw, ssl=True, ssl_ca_certs=str(certs / "ca.crt"),
                            ssl_certfile=str(certs / "client.crt"), ssl_keyfile=str(certs / "client.key"))
        try:
            state = check.sentinel_master("accelgen")
            assert not state["is_sdown"] and int(state["info-refresh"]) < 10_000, state
        finally:
            check.close()
        anonymous = redis.Redis(port=sentinel_port, ssl=True, ssl_ca_certs=str(certs / "ca.crt"),
                                ssl_certfile=str(certs / "client.crt"), ssl_keyfile=str(certs / "client.key"))
        try:
            with pytest.raises(rx.AuthenticationError):
                anonymous.execute_command("SENTINEL", "MASTERS")
        finally:
            anonymous.close()
    finally:
        sentinel.stop()
        master.stop()
