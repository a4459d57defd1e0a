"""The gateway's client trust boundary with real API keys, over real gRPC and HTTP: no key or a
wrong key is refused; a key cannot read, cancel, attach to or stream another key's request even
knowing its id (it gets the NOT_FOUND a random id gets); per-key rate and concurrency limits
answer 429 / RESOURCE_EXHAUSTED with when to retry; a class the key may not use is 403 /
PERMISSION_DENIED; a prompt over the size caps is refused before the tokenizer sees it.

The scheduler is the in-process fake (tests/support/gateway_stack.py): it stores the tenant and
label the gateway sends and returns them in GetRequest, as the real one does.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from accelgen.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from gateway.auth import default_tenant
from tests.support.gateway_stack import GatewayStack
from tests.support.in_process_worker import InProcessWorker
from tests.support.spy_tokenizer import SpyTokenizer, fresh_spied, gateway_with_spy

pytestmark = pytest.mark.integration

KEY_A = "key-a-" + "a" * 26
KEY_B = "key-b-" + "b" * 26
KEY_SLOW = "key-slow-" + "s" * 23
KEY_ONE = "key-one-" + "o" * 24
KEY_CODE = "key-code-" + "c" * 23
KEY_POLL = "key-poll-" + "p" * 23
MAX_CHARS = 40
HELLO = "Hello, world!"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayStack]:
    keys = Path(tmp_path_factory.mktemp("keys")) / "keys.txt"
    keys.write_text(f"""# tenants of this test
{KEY_A} name=team-a
{KEY_B} name=team-b
{KEY_SLOW} name=slow rate=0.2 burst=1
{KEY_ONE} name=one concurrency=1
{KEY_CODE} name=coder classes=code
{KEY_POLL} name=poll rate=0.01 burst=2
""")
    s = gateway_with_spy(api_keys=str(keys), max_prompt_chars=MAX_CHARS, max_messages=3, max_message_bytes=64 << 10)
    yield s
    s.close()


@pytest.fixture
def fresh(stack: GatewayStack) -> GatewayStack:
    return fresh_spied(stack)


@pytest.fixture
def stub(fresh: GatewayStack) -> Iterator[gateway_pb2_grpc.GatewayStub]:
    with grpc.insecure_channel(fresh.grpc_target) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


def _auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def _generate(stub: gateway_pb2_grpc.GatewayStub, key: str | None, **fields: Any) -> list[gateway_pb2.GenerateResponse]:
    if "tokenized" not in fields:
        fields.setdefault("text", "hi")
    return list(stub.Generate(gateway_pb2.GenerateRequest(**fields), timeout=10,
                              metadata=_auth(key) if key else None))


def _refused(call: Any, code: grpc.StatusCode) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value.details()
    return err.value


def _h(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def _post(stack: GatewayStack, key: str | None, body: dict[str, Any] | None = None,
          path: str = "/v1/completions", **kwargs: Any) -> httpx.Response:
    body = body if body is not None else {"prompt": "hi", "max_tokens": 20}
    return httpx.post(stack.http_base + path, json=body, headers=_h(key) if key else {}, timeout=10, **kwargs)


# -- no key, wrong key ------------------------------------------------------------------------------
@pytest.mark.parametrize("metadata", [None, (("authorization", "Bearer " + "z" * 32),),
                                      (("authorization", KEY_A),), (("authorization", "Basic " + KEY_A),)])
def test_grpc_without_a_valid_key_is_unauthenticated(fresh: GatewayStack, stub, metadata) -> None:
    calls = [lambda: list(stub.Generate(gateway_pb2.GenerateRequest(text="hi"), timeout=5, metadata=metadata)),
             lambda: list(stub.Attach(gateway_pb2.AttachRequest(request_id="r0"), timeout=5, metadata=metadata)),
             lambda: stub.GetRequest(common_pb2.GetRequestRequest(request_id="r0"), timeout=5, metadata=metadata),
             lambda: stub.Cancel(common_pb2.CancelRequest(request_id="r0"), timeout=5, metadata=metadata)]
    for call in calls:
        err = _refused(call, grpc.StatusCode.UNAUTHENTICATED)
        assert "API key" in err.details() or "Bearer KEY" in err.details()
        assert KEY_A not in err.details()
    assert fresh.fake.submits == [] and fresh.fake.get_requests == [] and fresh.fake.cancels == []
    # Health stays open: a load balancer has no key.
    with grpc.insecure_channel(fresh.grpc_target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer " + "z" * 32}, {"authorization": KEY_A},
                                     {"x-api-key": KEY_A}])
def test_http_without_a_valid_key_is_401_before_anything(fresh: GatewayStack, headers) -> None:
    base = fresh.http_base
    for method, path in (("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                         ("GET", "/v1/requests/r0"), ("GET", "/v1/requests/r0/events"), ("GET", "/v1/nothing"),
                         ("GET", "/docs")):
        r = httpx.request(method, base + path, headers=headers, json={"prompt": "hi"}, timeout=5)
        assert r.status_code == 401, (path, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
        assert KEY_A not in r.text
    assert fresh.fake.submits == [] and fresh.fake.get_requests == [] and SpyTokenizer.seen == []
    assert httpx.get(base + "/livez", timeout=5).status_code == 200
    assert httpx.get(base + "/health", timeout=5).status_code == 200


def test_the_openai_client_reads_the_401_and_works_with_a_key(fresh: GatewayStack) -> None:
    wrong = openai.OpenAI(base_url=fresh.http_base + "/v1", api_key="z" * 32, max_retries=0, timeout=10)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.completions.create(model="fake-model", prompt="hi")
    assert err.value.code == "invalid_api_key"
    right = openai.OpenAI(base_url=fresh.http_base + "/v1", api_key=KEY_A, max_retries=0, timeout=10)
    assert right.completions.create(model="fake-model", prompt="hi", max_tokens=20).choices[0].text == HELLO
    assert fresh.fake.submits[0].tenant == "team-a"


def test_401_comes_before_the_body_is_read(fresh: GatewayStack) -> None:
    """Headers announcing 100 MB, and no body at all: answered at once, from the headers."""
    with socket.create_connection(("127.0.0.1", fresh.handle.http_port), timeout=5) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000000\r\n\r\n")
        start = time.monotonic()
        head = sock.recv(4096).decode("latin-1")
    assert head.startswith("HTTP/1.1 401") and time.monotonic() - start < 3
    assert "www-authenticate: bearer" in head.lower()


# -- ownership -----------------------------------------------------------------------------------
def _same_not_found(a: str, a_id: str, b: str, b_id: str) -> None:
    """Two NOT_FOUND messages that differ only in the id they name."""
    assert a.replace(a_id, "ID") == b.replace(b_id, "ID"), (a, b)


def test_grpc_another_keys_request_is_not_found_like_a_random_id(fresh: GatewayStack, stub) -> None:
    out = _generate(stub, KEY_A, request_id="mine")
    rid = out[-1].request_id
    assert len(rid) == 32 and rid != "mine"  # the gateway's id; the client's is its label
    mine = stub.GetRequest(common_pb2.GetRequestRequest(request_id=rid), timeout=5, metadata=_auth(KEY_A))
    assert (mine.tenant, mine.label, list(mine.output_ids)) == ("team-a", "mine", [3 + b for b in HELLO.encode()])
    calls = {
        "GetRequest": lambda rid, key: stub.GetRequest(common_pb2.GetRequestRequest(request_id=rid), timeout=5,
                                                       metadata=_auth(key)),
        "Cancel": lambda rid, key: stub.Cancel(common_pb2.CancelRequest(request_id=rid), timeout=5,
                                               metadata=_auth(key)),
        "Attach": lambda rid, key: list(stub.Attach(gateway_pb2.AttachRequest(request_id=rid, keep_running=True),
                                                    timeout=5, metadata=_auth(key))),
    }
    for name, call in calls.items():
        for key in (KEY_B, KEY_CODE):
            for ask in (rid, "mine"):  # its id (known, leaked or guessed), and its label
                theirs = _refused(lambda: call(ask, key), grpc.StatusCode.NOT_FOUND).details()
                guess = uuid.uuid4().hex
                unknown = _refused(lambda: call(guess, key), grpc.StatusCode.NOT_FOUND).details()
                _same_not_found(theirs, ask, unknown, guess)
    assert rid not in fresh.fake.cancels  # no Cancel of it ever reached the scheduler
    assert not [w for w in fresh.fake.watches if w[0] == rid][1:]  # nobody else watched it
    # Its own key can do all of it.
    attached = list(stub.Attach(gateway_pb2.AttachRequest(request_id=rid, from_token_index=7), timeout=5,
                                metadata=_auth(KEY_A)))
    assert "".join(r.chunk.text for r in attached[:-1]) == "world!"
    assert stub.Cancel(common_pb2.CancelRequest(request_id=rid), timeout=5, metadata=_auth(KEY_A)).cancelled


def test_a_request_in_flight_is_cancelled_by_its_key_only_and_without_the_store(fresh: GatewayStack, stub) -> None:
    """A Cancel of a request this gateway streams for the caller needs no GetRequest: it works
    while the scheduler's store cannot be read. Another key still gets NOT_FOUND."""
    fresh.fake.token_delay_s = 0.05
    call = stub.Generate(gateway_pb2.GenerateRequest(text="hi", stream=True), timeout=10, metadata=_auth(KEY_A))
    rid = dict(call.initial_metadata())["x-request-id"]
    err = _refused(lambda: stub.Cancel(common_pb2.CancelRequest(request_id=rid), timeout=5, metadata=_auth(KEY_B)),
                   grpc.StatusCode.NOT_FOUND)
    assert err.details() == f"request {rid!r} is unknown (or expired)" and rid not in fresh.fake.cancels
    fresh.fake.get_request_error = (grpc.StatusCode.UNAVAILABLE, "the state store (Redis) is unavailable")
    reads = len(fresh.fake.get_requests)
    assert stub.Cancel(common_pb2.CancelRequest(request_id=rid), timeout=5, metadata=_auth(KEY_A)).cancelled
    assert rid in fresh.fake.cancels and len(fresh.fake.get_requests) == reads
    assert list(call)[-1].complete.finish_reason == "abort"


def test_http_another_keys_request_is_404_like_a_random_id(fresh: GatewayStack) -> None:
    r = httpx.post(fresh.http_base + "/v1/completions", json={"prompt": "hi", "max_tokens": 20},
                   headers={**_h(KEY_A), "x-request-id": "my-label"}, timeout=10)
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    assert len(rid) == 32 and r.json()["id"] == f"cmpl-{rid}"
    own = httpx.get(f"{fresh.http_base}/v1/requests/{rid}", headers=_h(KEY_A), timeout=5)
    assert own.status_code == 200 and own.json()["text"] == HELLO and own.json()["label"] == "my-label"
    random_id = uuid.uuid4().hex
    for path in ("/v1/requests/{}", "/v1/requests/{}/events", "/v1/requests/cmpl-{}"):
        theirs = httpx.get(fresh.http_base + path.format(rid), headers=_h(KEY_B), timeout=5)
        unknown = httpx.get(fresh.http_base + path.format(random_id), headers=_h(KEY_B), timeout=5)
        assert theirs.status_code == unknown.status_code == 404
        _same_not_found(theirs.json()["error"]["message"], rid, unknown.json()["error"]["message"], random_id)
        assert theirs.json()["error"].keys() == unknown.json()["error"].keys()
    # Across protocols too: key B over gRPC cannot read key A's HTTP request.
    with grpc.insecure_channel(fresh.grpc_target) as channel:
        _refused(lambda: gateway_pb2_grpc.GatewayStub(channel).GetRequest(
            common_pb2.GetRequestRequest(request_id=rid), timeout=5, metadata=_auth(KEY_B)), grpc.StatusCode.NOT_FOUND)
    with httpx.stream("GET", f"{fresh.http_base}/v1/requests/{rid}/events?from_token=7", headers=_h(KEY_A),
                      timeout=10) as resp:
        assert resp.status_code == 200
        assert resp.read().decode().endswith("data: [DONE]\n\n")


# -- limits ----------------------------------------------------------------------------------------
def test_over_the_rate_is_429_with_retry_after(fresh: GatewayStack, stub) -> None:
    _generate(stub, KEY_SLOW)  # the one request its burst allows
    err = _refused(lambda: _generate(stub, KEY_SLOW), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "rate limit of 0.2 calls/s" in err.details()
    retry_ms = dict(err.trailing_metadata())["retry-after-ms"]
    assert 3000 <= int(retry_ms) <= 5000
    r = _post(fresh, KEY_SLOW)
    assert r.status_code == 429 and 3 <= int(r.headers["retry-after"]) <= 5
    assert r.json()["error"]["code"] == 429 and "rate limit" in r.json()["error"]["message"]
    r = httpx.get(f"{fresh.http_base}/v1/requests/{uuid.uuid4().hex}/events", headers=_h(KEY_SLOW), timeout=5)
    assert r.status_code == 429  # an Attach is a new request too
    assert len(fresh.fake.submits) == 1 and SpyTokenizer.seen == [2]  # refused before the body was looked at
    _generate(stub, KEY_A)  # other keys are not affected


def test_over_the_concurrency_is_429_until_a_stream_ends(fresh: GatewayStack, stub) -> None:
    fresh.fake.token_delay_s = 0.05
    stream = stub.Generate(gateway_pb2.GenerateRequest(text="hi", stream=True), timeout=10, metadata=_auth(KEY_ONE))
    next(stream)  # in flight
    err = _refused(lambda: _generate(stub, KEY_ONE), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "1 requests in flight" in err.details() and dict(err.trailing_metadata())["retry-after-ms"] == "1000"
    r = _post(fresh, KEY_ONE)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    _generate(stub, KEY_A)  # another key's streams are its own
    list(stream)  # the stream ends: its place is free again
    fresh.fake.token_delay_s = 0.001
    assert fresh.wait_for(lambda: _post(fresh, KEY_ONE).status_code == 200)
    # An abandoned stream frees its place too.
    fresh.fake.token_delay_s = 0.05
    with httpx.stream("POST", fresh.http_base + "/v1/completions", headers=_h(KEY_ONE), timeout=10,
                      json={"prompt": "hi", "stream": True, "max_tokens": 20}) as resp:
        lines = resp.iter_lines()  # kept: a dropped iterator closes the response
        next(line for line in lines if line.startswith("data: "))
        assert _post(fresh, KEY_ONE).status_code == 429
    fresh.fake.token_delay_s = 0.001
    assert fresh.wait_for(lambda: _post(fresh, KEY_ONE).status_code == 200)


def test_every_sample_counts_under_the_concurrency(fresh: GatewayStack, stub) -> None:
    """n samples are n requests at the scheduler: under concurrency=1 a call of 2 could never run,
    so it is refused as bad input (not 429: waiting never helps), before anything is submitted."""
    submitted = len(fresh.fake.submits)
    r = _post(fresh, KEY_ONE, {"prompt": "hi", "max_tokens": 2, "n": 2, "temperature": 1.0})
    assert r.status_code == 400 and "more than API key 'one' may run at once (1" in r.json()["error"]["message"]
    err = _refused(lambda: _generate(stub, KEY_ONE, n=2, sampling_params=common_pb2.SamplingParams(temperature=1.0)),
                   grpc.StatusCode.INVALID_ARGUMENT)
    assert "ask for fewer samples" in err.details()
    assert len(fresh.fake.submits) == submitted
    assert _post(fresh, KEY_ONE).status_code == 200  # the refused calls left no place taken


def test_reads_and_cancels_count_against_the_rate_too(fresh: GatewayStack, stub) -> None:
    """GetRequest, Cancel, /v1/requests/{id} and /v1/models each cost a scheduler call (the state
    read detokenises the prompt too): a key polling them is held to its rate like one submitting."""
    rid = uuid.uuid4().hex
    _refused(lambda: stub.GetRequest(common_pb2.GetRequestRequest(request_id=rid), timeout=5,
                                     metadata=_auth(KEY_POLL)), grpc.StatusCode.NOT_FOUND)
    assert httpx.get(f"{fresh.http_base}/v1/requests/{rid}", headers=_h(KEY_POLL), timeout=5).status_code == 404
    assert len(fresh.fake.get_requests) == 2  # its burst of 2: spent
    calls = [lambda: stub.GetRequest(common_pb2.GetRequestRequest(request_id=rid), timeout=5,
                                     metadata=_auth(KEY_POLL)),
             lambda: stub.Cancel(common_pb2.CancelRequest(request_id=rid), timeout=5, metadata=_auth(KEY_POLL))]
    for call in calls:
        err = _refused(call, grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "rate limit of 0.01 calls/s" in err.details() and int(dict(err.trailing_metadata())["retry-after-ms"]) > 0
    for path in (f"/v1/requests/{rid}", f"/v1/requests/cmpl-{rid}", "/v1/models"):
        r = httpx.get(fresh.http_base + path, headers=_h(KEY_POLL), timeout=5)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, (path, r.text)
    assert len(fresh.fake.get_requests) == 2 and fresh.fake.cancels == []  # refused before the scheduler
    assert httpx.get(fresh.http_base + "/v1/models", headers=_h(KEY_A), timeout=5).status_code == 200


# -- classes ---------------------------------------------------------------------------------------
def test_a_class_the_key_may_not_use_is_permission_denied(fresh: GatewayStack, stub) -> None:
    err = _refused(lambda: _generate(stub, KEY_CODE, app_class="chat"), grpc.StatusCode.PERMISSION_DENIED)
    assert "'chat' is not allowed for this API key" in err.details() and "code" in err.details()
    r = _post(fresh, KEY_CODE, {"prompt": "hi", "app_class": "chat"})
    assert r.status_code == 403 and r.json()["error"]["param"] == "app_class"
    tight = common_pb2.SLOSpec(ttft_ms=100, tbt_ms=20)  # within the gateway's bounds, tighter than "code"
    err = _refused(lambda: _generate(stub, KEY_CODE, app_class="code", slo=tight), grpc.StatusCode.PERMISSION_DENIED)
    assert "tighter than this API key may ask for" in err.details()
    r = _post(fresh, KEY_CODE, {"prompt": "hi", "slo_ttft_ms": 100, "slo_tbt_ms": 20})
    assert r.status_code == 403 and r.json()["error"]["param"] in ("slo_ttft_ms", "slo_tbt_ms")
    assert fresh.fake.submits == []
    _generate(stub, KEY_CODE)  # no class named: the key's own (the gateway's default "chat" is not allowed)
    _generate(stub, KEY_A, slo=tight)  # a key without classes= may
    assert [(s.app_class, s.tenant) for s in fresh.fake.submits] == [("code", "coder"), ("chat", "team-a")]


# -- sizes -----------------------------------------------------------------------------------------
def test_a_too_long_prompt_is_refused_before_tokenising(fresh: GatewayStack, stub) -> None:
    err = _refused(lambda: _generate(stub, KEY_A, text="x" * (MAX_CHARS + 1)), grpc.StatusCode.INVALID_ARGUMENT)
    assert f"{MAX_CHARS + 1} characters" in err.details() and "max_prompt_chars" in err.details()
    r = _post(fresh, KEY_A, {"prompt": "x" * (MAX_CHARS + 1)})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    many = [{"role": "user", "content": "x" * 15}] * 3  # 45 characters in all
    r = _post(fresh, KEY_A, {"messages": many}, path="/v1/chat/completions")
    assert r.status_code == 400 and "their contents together" in r.json()["error"]["message"]
    r = _post(fresh, KEY_A, {"messages": [{"role": "user", "content": "x"}] * 4}, path="/v1/chat/completions")
    assert r.status_code == 400 and "max_messages" in r.json()["error"]["message"]
    r = _post(fresh, KEY_A, {"prompt": "hi", "stop_token_ids": [5] * 5000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop_token_ids"
    assert SpyTokenizer.seen == [] and fresh.fake.submits == []  # the tokenizer never saw any of them
    _generate(stub, KEY_A, text="x" * MAX_CHARS)  # at the cap: fine
    assert SpyTokenizer.seen == [MAX_CHARS]


def test_the_cli_sends_its_api_key(fresh: GatewayStack, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from launcher.cli import main as cli

    args = ["generate", "hi", "--gateway", fresh.grpc_target, "--max-tokens", "20", "--timeout", "10"]
    monkeypatch.delenv("ACCELGEN_API_KEY", raising=False)
    assert cli(args) == 1 and "UNAUTHENTICATED" in capsys.readouterr().err
    assert cli([*args, "--api-key", KEY_A]) == 0 and HELLO in capsys.readouterr().out
    monkeypatch.setenv("ACCELGEN_API_KEY", KEY_B)
    assert cli(args) == 0
    assert [s.tenant for s in fresh.fake.submits] == ["team-a", "team-b"]


def test_a_grpc_message_over_max_message_bytes_is_refused_by_grpc(fresh: GatewayStack, stub) -> None:
    big = common_pb2.TokenizedInput(input_ids=[100_000] * 30_000)  # 3 bytes each: > 64 KiB on the wire
    err = _refused(lambda: _generate(stub, KEY_A, tokenized=big), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "message" in err.details().lower()
    assert fresh.fake.submits == []


# -- with the real scheduler -------------------------------------------------------------------------
def test_tenants_are_kept_by_the_real_scheduler_and_enforced(tmp_path: Path) -> None:
    """The tenant and label travel through a real scheduler and its Redis record: the owner reads
    its request back, another key gets the NOT_FOUND of an id nobody has."""
    from gateway.config import GatewayConfig
    from gateway.main import start_gateway
    from launcher.stack import start_redis
    from scheduler_service.config import SchedulerConfig
    from scheduler_service.main import start_scheduler
    from tests.support.gateway_stack import LoopThread

    redis, url = start_redis(workdir=tmp_path)
    loop = LoopThread()

    async def up() -> tuple[Any, Any]:
        scheduler = await start_scheduler(SchedulerConfig(port=0, redis_url=url, heartbeat_ttl_s=60.0))
        worker = InProcessWorker()
        await scheduler.app.workers.register("w0", "127.0.0.1:1", worker.servicer.info)
        scheduler.app.workers.lanes["w0"].link.stub = worker
        gateway = await start_gateway(GatewayConfig(scheduler_address=scheduler.address, host="127.0.0.1",
                                                    grpc_port=0, http_port=-1, api_key=[KEY_A, KEY_B]))
        return scheduler, gateway

    scheduler, gateway = loop.run(up())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            tokenized = common_pb2.TokenizedInput(input_ids=[7] * 8)
            out = list(stub.Generate(gateway_pb2.GenerateRequest(
                tokenized=tokenized, request_id="real-1", sampling_params=common_pb2.SamplingParams(
                    max_new_tokens=4, ignore_eos=True)), timeout=30, metadata=_auth(KEY_A)))
            rid = out[-1].request_id
            mine = stub.GetRequest(common_pb2.GetRequestRequest(request_id=rid), timeout=5, metadata=_auth(KEY_A))
            assert (mine.tenant, mine.label, mine.status, len(mine.output_ids)) == (
                default_tenant(KEY_A), "real-1", "finished", 4)
            guess = uuid.uuid4().hex
            for ask in (rid, guess):
                err = _refused(lambda: stub.GetRequest(common_pb2.GetRequestRequest(request_id=ask), timeout=5,
                                                       metadata=_auth(KEY_B)), grpc.StatusCode.NOT_FOUND)
                assert err.details() == f"request {ask!r} is unknown (or expired)"
    finally:
        loop.run(gateway.stop())
        loop.run(scheduler.stop(grace_s=0.2))
        loop.close()
        redis.stop()
