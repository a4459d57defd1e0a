"""API keys, per-key limits and the class rule of the gateway (gateway.auth, gateway.limits), and
how keys are configured (list settings in accelgen.common.config). Pure: no servers."""

from __future__ import annotations

import gc
import hashlib
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect
from structlog.testing import capture_logs

from accelgen.common.config import ConfigError
from accelgen.common.tls import is_loopback
from accelgen.core.slo import SLO, SLOCatalog
from gateway.auth import (OPEN, Caller, KeyRing, LimitDefaults, default_tenant, load_keys, parse_keys_file,
                          warn_if_open)
from gateway.config import LOADER, GatewayConfig
from gateway.convert import GRPC_NAMES
from gateway.errors import GatewayError, retry_after_ms
from gateway.limits import KeyLimits, TokenBucket, server_options
from gateway.openai_http import POLICY_VIOLATION, create_app

pytestmark = pytest.mark.unit

KEY_A = "a" * 32
KEY_B = "b-" + "x" * 30


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _refused(fn, *args, code: grpc.StatusCode = grpc.StatusCode.PERMISSION_DENIED) -> GatewayError:
    with pytest.raises(GatewayError) as err:
        fn(*args)
    assert err.value.code == code
    return err.value


# -- keys and the keys file ----------------------------------------------------------------------
def test_keys_file_lines_comments_and_settings() -> None:
    text = f"""
    # team keys
    {KEY_A}   name=team-a rate=10 burst=20 concurrency=8 classes=chat, # trailing comment
    {KEY_B}
    c#not-a-comment-{"y" * 10}  classes=batch
    """
    a, b, c = parse_keys_file(text, "keys.txt")
    assert a.tenant == "team-a" and a.where == "keys.txt line 3"
    assert (a.policy.rate_per_s, a.policy.burst, a.policy.concurrency, a.policy.classes) == (10.0, 20, 8, ("chat",))
    assert b.tenant == "key-" + hashlib.sha256(KEY_B.encode()).hexdigest()[:12] == default_tenant(KEY_B)
    assert b.policy.rate_per_s is None and b.policy.classes == ()
    assert c.policy.classes == ("batch",)  # a '#' inside a key is part of it
    assert a.digest == hashlib.sha256(KEY_A.encode()).digest()
    assert KEY_A not in repr(a) and KEY_A not in repr((a, b, c))  # the key itself is not kept


@pytest.mark.parametrize("line, message", [
    ("short", "at least 16 characters (it has 5)"),
    (f"{KEY_A} rate=fast", "rate='fast' must be a number"),
    (f"{KEY_A} rate=-1", "rate='-1'"),
    (f"{KEY_A} burst=1.5", "burst='1.5' must be a whole number"),
    (f"{KEY_A} color=red", "unknown key setting 'color'"),
    (f"{KEY_A} name=a/b", "name='a/b'"),
    (f"{KEY_A} classes=", "classes= must name at least one"),
    (f"{KEY_A} name=x name=y", "name= is given twice"),
    (f"{KEY_A} chat", "'chat' is not a setting"),
])
def test_bad_key_lines_are_refused_naming_the_line(line: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_keys_file(f"# header\n{line}\n", "keys.txt")
    assert "keys.txt line 2" in str(err.value) and message in str(err.value)
    assert "short" not in str(err.value) or line == "short"  # a key is never quoted back...
    assert KEY_A not in str(err.value)


def test_keys_from_flags_env_and_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{KEY_B} name=team-b\n")
    cfg = LOADER.parse(["--api-key", KEY_A, "--api-key", "c" * 16, "--api-keys", str(keys)], {})
    assert [k.tenant for k in cfg.keys] == [default_tenant(KEY_A), default_tenant("c" * 16), "team-b"]
    assert KEY_A not in repr(cfg)  # nor in the config's repr (a log line)
    # The environment: comma-separated, under the gateway's name or the shorter one the issue names.
    assert len(LOADER.parse([], {"ACCELGEN_GATEWAY_API_KEY": f"{KEY_A}, {KEY_B},"}).keys) == 2
    assert len(LOADER.parse([], {"ACCELGEN_API_KEY": KEY_A}).keys) == 1
    assert LOADER.parse([], {"ACCELGEN_GATEWAY_API_KEY": KEY_A, "ACCELGEN_API_KEY": "ignored"}).api_key == [KEY_A]
    # A flag replaces the environment's list whole; the file's list is an array of strings.
    assert LOADER.parse(["--api-key", KEY_B], {"ACCELGEN_GATEWAY_API_KEY": KEY_A}).api_key == [KEY_B]
    toml = tmp_path / "gw.toml"
    toml.write_text(f'api_key = ["{KEY_A}", "{KEY_B}"]\n')
    assert LOADER.parse(["--config", str(toml)], {}).api_key == [KEY_A, KEY_B]
    toml.write_text('api_key = "one-string-not-a-list"\n')
    with pytest.raises(ConfigError, match="api_key='one-string-not-a-list' is not a valid list of str"):
        LOADER.parse(["--config", str(toml)], {})
    assert GatewayConfig().keys == () and GatewayConfig().api_key == []


@pytest.mark.parametrize("argv, message", [
    (["--api-key", "tooshort"], "api_key #1: an API key must have at least 16 characters"),
    (["--api-key", KEY_A, "--api-key", KEY_A], "api_key #2: the same API key as api_key #1"),
    (["--api-keys", "/nonexistent/keys.txt"], "api_keys: cannot read /nonexistent/keys.txt"),
    (["--key-rate-per-s", "-1"], "key_rate_per_s must be a finite number >= 0"),
    (["--key-max-concurrent", "-2"], "key_max_concurrent must be >= 0"),
    (["--max-prompt-chars", "0"], "max_prompt_chars must be at least 1"),
])
def test_bad_key_configuration_is_a_config_error(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        LOADER.parse(argv, {})
    assert message in str(err.value) and "tooshort" not in str(err.value)


def test_main_exits_2_on_a_short_key(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        LOADER.main_config(["--api-key", "x" * 15], {})
    assert exit_.value.code == 2
    assert "accelgen gateway: config error: api_key #1" in capsys.readouterr().err


# -- authentication ------------------------------------------------------------------------------
def test_authenticate_bearer_only_and_never_quotes_the_key() -> None:
    ring = KeyRing(load_keys([KEY_A], None))
    assert ring.authenticate(f"Bearer {KEY_A}").tenant == default_tenant(KEY_A)
    assert ring.authenticate(f"bearer   {KEY_A} ").tenant == default_tenant(KEY_A)  # scheme is case-blind
    for bad, says in ((None, "required"), ("", "required"), (KEY_A, "Bearer KEY"), (f"Basic {KEY_A}", "Bearer KEY"),
                      ("Bearer ", "Bearer KEY"), ("Bearer " + KEY_A[:-1], "not valid"),
                      ("Bearer " + KEY_B, "not valid")):
        err = _refused(ring.authenticate, bad, code=grpc.StatusCode.UNAUTHENTICATED)
        assert says in err.message and KEY_A[:-1] not in err.message and KEY_B not in err.message


def test_open_ring_lets_everyone_in_as_the_empty_tenant() -> None:
    ring = KeyRing(())
    assert ring.open and ring.authenticate(None) is OPEN and ring.authenticate("Bearer whatever") is OPEN
    assert OPEN.tenant == "" and OPEN.limits is None


def test_keys_sharing_a_name_share_a_tenant_but_not_limits() -> None:
    keys = parse_keys_file(f"{KEY_A} name=team concurrency=1\n{KEY_B} name=team concurrency=1\n", "k")
    ring = KeyRing(keys)
    a, b = ring.authenticate(f"Bearer {KEY_A}"), ring.authenticate(f"Bearer {KEY_B}")
    assert a.tenant == b.tenant == "team" and a.limits is not b.limits
    lease = a.admit()
    b.admit().release()  # b's cap is its own
    _refused(a.admit, code=grpc.StatusCode.RESOURCE_EXHAUSTED)
    lease.release()


def test_start_up_warning_when_open_beyond_loopback() -> None:
    with capture_logs() as logs:
        assert warn_if_open(KeyRing(()), "0.0.0.0", is_loopback)
        assert not warn_if_open(KeyRing(()), "127.0.0.1", is_loopback)
        assert not warn_if_open(KeyRing(()), "::1", is_loopback)
        assert not warn_if_open(KeyRing(load_keys([KEY_A], None)), "0.0.0.0", is_loopback)
    assert [entry["event"] for entry in logs] == ["gateway_open_without_api_keys"]
    assert logs[0]["log_level"] == "warning" and logs[0]["host"] == "0.0.0.0"


# -- limits ----------------------------------------------------------------------------------------
def test_token_bucket_rate_and_burst() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=2.0, burst=3, clock=clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.5)  # one token in 1/rate s
    assert bucket.take() == pytest.approx(0.5)  # a refusal consumes nothing
    clock.now += 0.5
    assert bucket.take() == 0.0 and bucket.take() == pytest.approx(0.5)
    clock.now += 100
    assert [bucket.take() for _ in range(4)][:3] == [0.0, 0.0, 0.0]  # refilled to burst, no more


def test_key_limits_refuse_with_a_retry_hint() -> None:
    clock = Clock()
    limits = KeyLimits("team", rate_per_s=1.0, burst=0, concurrency=2, clock=clock)
    assert limits.bucket is not None and limits.bucket.burst == 1  # burst 0: one second's worth
    first = limits.admit()
    err = _refused(limits.admit, code=grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "rate limit of 1 calls/s" in err.message and retry_after_ms(err) == 1000
    clock.now += 0.25
    assert retry_after_ms(_refused(limits.admit, code=grpc.StatusCode.RESOURCE_EXHAUSTED)) == 750
    clock.now += 1
    second = limits.admit()
    clock.now += 10
    err = _refused(limits.admit, code=grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "2 requests in flight" in err.message and retry_after_ms(err) == 1000
    first.release()
    first.release()  # once only
    assert limits.in_flight == 1
    third = limits.admit()  # at once: the refusal on concurrency spent no rate token
    second.release()
    third.release()
    assert limits.in_flight == 0


def test_each_sample_of_a_call_takes_a_concurrency_place() -> None:
    limits = KeyLimits("team", rate_per_s=0.0, burst=0, concurrency=4)
    three = limits.admit()
    three.widen(2)  # n = 3: three streams
    assert limits.in_flight == 3
    two = limits.admit()
    err = _refused(lambda: two.widen(1), code=grpc.StatusCode.RESOURCE_EXHAUSTED)  # 3 + 2 > 4: wait
    assert "needs 2 places under its limit of 4" in err.message and retry_after_ms(err) == 1000
    assert limits.in_flight == 4  # the refused widening took nothing; its caller releases the lease
    two.release()
    one = limits.admit()
    err = _refused(lambda: one.widen(4), code=grpc.StatusCode.INVALID_ARGUMENT)  # 5 > 4: never
    assert "runs 5 requests" in err.message and "ask for fewer" in err.message
    one.release()
    three.release()
    assert limits.in_flight == 0  # every place of the widened lease, once
    open_lease = KeyLimits("open", 0.0, 0, 0).admit()
    open_lease.widen(100)  # no cap: nothing refused
    open_lease.release()


def test_a_call_that_starts_no_stream_takes_a_rate_token_only() -> None:
    clock = Clock()
    limits = KeyLimits("team", rate_per_s=1.0, burst=2, concurrency=1, clock=clock)
    lease = limits.admit()
    limits.charge()  # a read while its one stream runs: no concurrency place needed
    err = _refused(limits.charge, code=grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "rate limit of 1 calls/s" in err.message and retry_after_ms(err) == 1000
    assert limits.in_flight == 1
    lease.release()
    KeyLimits("open", 0.0, 0, 1).charge()  # no rate: nothing to count
    caller = KeyRing(parse_keys_file(f"{KEY_A} rate=1 burst=1\n", "k")).authenticate(f"Bearer {KEY_A}")
    caller.charge()
    _refused(caller.charge, code=grpc.StatusCode.RESOURCE_EXHAUSTED)
    OPEN.charge()


def test_a_websocket_without_a_key_is_closed_before_the_app_sees_it() -> None:
    """No route takes a websocket today; the middleware must not be what lets one through when
    one does: a websocket scope is denied unless it carries a valid key."""
    app = create_app(SimpleNamespace(keys=KeyRing(load_keys([KEY_A], None))))  # type: ignore[arg-type]
    reached: list[str] = []

    @app.websocket("/v1/ws")
    async def ws(websocket: WebSocket) -> None:
        reached.append(websocket.headers.get("authorization", ""))
        await websocket.accept()
        await websocket.send_text("in")
        await websocket.close()

    client = TestClient(app)
    for headers in ({}, {"authorization": "Bearer " + "z" * 32}, {"authorization": KEY_A}):
        with pytest.raises(WebSocketDisconnect) as closed:
            with client.websocket_connect("/v1/ws", headers=headers):
                pass
        assert closed.value.code == POLICY_VIOLATION
    assert reached == []
    with client.websocket_connect("/v1/ws", headers={"authorization": f"Bearer {KEY_A}"}) as socket:
        assert socket.receive_text() == "in"
    assert reached == [f"Bearer {KEY_A}"]


def test_a_lease_is_released_on_failure_and_when_dropped() -> None:
    limits = KeyLimits("team", 0.0, 0, 1)
    with pytest.raises(RuntimeError), limits.admit().until_failure():
        raise RuntimeError("prepare failed")
    assert limits.in_flight == 0
    with limits.admit().until_failure() as kept:
        pass
    assert limits.in_flight == 1  # held: the request took it over
    del kept
    gc.collect()
    assert limits.in_flight == 0  # an HTTP body nobody iterated: the collector gives it back


def test_defaults_apply_to_keys_without_their_own() -> None:
    keys = parse_keys_file(f"{KEY_A}\n{KEY_B} rate=0 concurrency=0\n", "k")
    ring = KeyRing(keys, LimitDefaults(rate_per_s=5, burst=2, concurrency=3))
    a, b = ring.authenticate(f"Bearer {KEY_A}"), ring.authenticate(f"Bearer {KEY_B}")
    assert a.limits is not None and a.limits.concurrency == 3 and a.limits.bucket.burst == 2
    assert b.limits is None  # its own 0s: unlimited


def test_server_options_bound_what_a_client_may_send() -> None:
    assert server_options(1234) == [("grpc.max_receive_message_length", 1234)]


# -- classes ---------------------------------------------------------------------------------------
CATALOG = SLOCatalog()  # chat 1000/50 ms, code 3750/187.5 ms, summarization 10000/500 ms, batch (JCT only)


def test_a_key_may_use_only_its_classes() -> None:
    caller = Caller(tenant="t", classes=("code", "summarization"))
    caller.check_class("code", None, CATALOG, GRPC_NAMES)
    err = _refused(caller.check_class, "chat", None, CATALOG, GRPC_NAMES)
    assert err.param == "app_class" and "'chat' is not allowed" in err.message and "code, summarization" in err.message
    OPEN.check_class("chat", SLO(ttft_s=0.01, tbt_s=0.005), CATALOG, GRPC_NAMES)  # no classes: anything


def test_an_explicit_slo_may_not_be_tighter_than_the_keys_tightest_class() -> None:
    caller = Caller(tenant="t", classes=("code", "summarization"))
    code = CATALOG.get("code").slo
    caller.check_class("code", SLO(ttft_s=code.ttft_s, tbt_s=code.tbt_s), CATALOG, GRPC_NAMES)  # equal: fine
    caller.check_class("summarization", SLO(ttft_s=60, tbt_s=1), CATALOG, GRPC_NAMES)
    err = _refused(caller.check_class, "summarization", SLO(ttft_s=60, tbt_s=code.tbt_s / 2), CATALOG, GRPC_NAMES)
    assert err.param == "slo.tbt_ms" and "tighter than this API key may ask for" in err.message
    assert f"at least {code.tbt_s * 1000:g} ms" in err.message
    err = _refused(caller.check_class, "code", SLO(ttft_s=code.ttft_s / 2, tbt_s=1), CATALOG, GRPC_NAMES)
    assert err.param == "slo.ttft_ms"


def test_a_kind_no_allowed_class_sets_may_not_be_asked_for() -> None:
    batch_only = Caller(tenant="t", classes=("batch",))
    batch = CATALOG.get("batch").slo
    assert batch.tbt_s is None and batch.jct_s is not None
    err = _refused(batch_only.check_class, "batch", SLO(ttft_s=1, tbt_s=0.005), CATALOG, GRPC_NAMES)
    assert "set no ttft SLO" in err.message
    batch_only.check_class("batch", SLO(jct_s=batch.jct_s), CATALOG, GRPC_NAMES)
    _refused(batch_only.check_class, "batch", SLO(jct_s=batch.jct_s / 2), CATALOG, GRPC_NAMES)


def test_a_request_without_class_gets_the_keys_first_when_the_default_is_not_allowed() -> None:
    assert Caller(tenant="t", classes=("batch", "code")).default_class("chat") == "batch"
    assert Caller(tenant="t", classes=("code", "chat")).default_class("chat") == "chat"
    assert OPEN.default_class("chat") == "chat"
