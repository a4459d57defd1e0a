"""Property-based fuzzing of the gateway's OpenAI-compatible HTTP API (a real gateway, the fake
scheduler of ``tests/support/gateway_stack.py``).

The property: whatever the bytes, the answer is a 2xx or a 4xx whose JSON body says what is
wrong, never a 5xx; an SSE stream ends with ``[DONE]`` and carries no 5xx error event; and the
gateway still serves afterwards. ``bench/fuzz.py`` runs the same inputs >= 10,000 times against
a gateway process and a real scheduler; this file runs a bounded number on every ``make test``.
Inputs that once produced a 5xx stay here as ``@example``s.
"""

from __future__ import annotations

import json
from typing import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings

from bench.fuzz_inputs import HttpInput, http_request
from tests.support.gateway_stack import FakeScheduler, GatewayStack

pytestmark = pytest.mark.integration

MAX_BODY = 1 << 20

FUZZ = settings(max_examples=200, deadline=None, database=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def stack() -> Iterator[GatewayStack]:
    s = GatewayStack(FakeScheduler(vocab_size=300), reconnect_timeout_s=3.0, served_model_name="alias",
                     max_body_bytes=MAX_BODY)
    yield s
    s.close()


@pytest.fixture(scope="module")
def http(stack: GatewayStack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.http_base, timeout=30) as client:
        yield client


def check_answer(http: httpx.Client, inp: HttpInput) -> httpx.Response:
    """Send ``inp``; assert the property; return the response for further checks."""
    r = http.request(inp.method, inp.path, content=inp.body, headers=inp.headers)
    assert r.status_code < 500, f"{r.status_code} for {inp.describe()}: {r.text[:500]}"
    if r.status_code >= 400 and inp.method != "HEAD" and inp.path.startswith("/v1/") and \
            r.headers.get("content-type", "").startswith("application/json"):
        err = r.json()
        message = err["error"]["message"] if "error" in err else err.get("detail")
        assert message, f"an error without a message for {inp.describe()}: {r.text[:300]}"
    if r.status_code == 200 and r.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", f"stream did not end with [DONE]: {r.text[-300:]}"
        for e in events[:-1]:
            payload = json.loads(e)
            assert payload.get("error", {}).get("code", 200) < 500, f"in-band {payload} for {inp.describe()}"
    return r


@FUZZ
@given(inp=http_request(huge_bodies=False))
@example(inp=HttpInput("POST", "/v1/completions", b'{"prompt": "a", "max_tokens": ' + b"9" * 4301 + b"}"))
@example(inp=HttpInput("POST", "/v1/completions", b'{"prompt": "a", "model": "\\udfff"}'))
@example(inp=HttpInput("POST", "/v1/completions", b'{"prompt": "a", "app_class": "\\ud800"}'))
@example(inp=HttpInput("POST", "/v1/chat/completions", b'{"messages": [{"role": "\\udc80", "content": "a"}]}'))
@example(inp=HttpInput("POST", "/v1/completions", b'{"prompt": "a", "user": ' + b"[" * 900 + b"]" * 900 + b"}"))
@example(inp=HttpInput("POST", "/v1/completions", b'{"prompt": "a", "n": ' + b"[" * 980 + b"]" * 980 + b"}"))
def test_no_input_gets_a_5xx(http: httpx.Client, inp: HttpInput) -> None:
    check_answer(http, inp)


@pytest.mark.parametrize("body, status, needle", [
    (b'{"prompt": "a", "max_tokens": ' + b"9" * 4301 + b"}", 400, "max_tokens = 999999999999... (an integer of 4301"),
    (b'{"prompt": [1, ' + b"9" * 5000 + b'], "max_tokens": 2}', 400, "prompt[1] must be a token id"),
    (b'{"prompt": "a", "temperature": NaN}', 400, "NaN"),
    (b'{"prompt": "a", "temperature": Infinity}', 400, "Infinity"),
    (b'{"prompt": "a", "temperature": 1e999}', 400, "temperature must be a finite number"),
    (b'{"prompt": "a", "temperature": 1e300}', 400, "temperature"),
    (b'{"prompt": "\xff\xfe"}', 400, "JSON"),
    (b'{"prompt": "a", "user": ' + b"[" * 100 + b"]" * 100 + b"}", 400, "nested"),
    (b'{"prompt": "a", "user": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400, "nested"),
    (b'{"prompt": "a", "model": "\\udfff"}', 400, "Unicode"),
    (b'{"prompt": [1, 2, 299, 300], "max_tokens": 2}', 400, "vocabulary"),
    (b'{"prompt": "a", "n": 1000000000000}', 400, "n = "),
    (b'{"prompt": "a", "max_tokens": 100000000000}', 400, "max_tokens"),
    (b'{"prompt": "a", "logprobs": 50}', 400, "logprobs"),
    (b'{"prompt": "a", "max_tokens": "5"}', 400, "max_tokens"),
    (b'{"prompt": {"a": 1}}', 400, "prompt"),
])
def test_hostile_bodies_get_a_clear_400(http: httpx.Client, body: bytes, status: int, needle: str) -> None:
    r = http.post("/v1/completions", content=body)
    assert r.status_code == status, r.text[:500]
    assert needle in r.json()["error"]["message"], r.text[:500]


def test_a_body_over_the_limit_is_413_and_the_gateway_keeps_serving(http: httpx.Client, stack: GatewayStack) -> None:
    big = b'{"prompt": "' + b"a" * (MAX_BODY + 10) + b'"}'
    r = http.post("/v1/completions", content=big)
    assert r.status_code == 413, r.text[:300]
    assert str(MAX_BODY) in r.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds for a chunked body too
        yield b'{"prompt": "'
        for _ in range(MAX_BODY // 65536 + 2):
            yield b"a" * 65536
        yield b'"}'

    r = http.post("/v1/completions", content=chunks())
    assert r.status_code == 413, r.text[:300]
    ok = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "Hello, world!"
    assert http.get("/health").status_code == 200
