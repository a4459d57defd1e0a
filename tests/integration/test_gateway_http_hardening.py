"""The gateway's HTTP front end against hostile clients, with real keys over real sockets: a
huge header block is refused before the key is looked at (h11's ``max_header_bytes``), a chat
role or a templated chat prompt over the caps is refused before the tokenizer sees it, and a
stream whose client left before its first byte is cancelled and frees its key's place even
when its body is never iterated.

The scheduler is the in-process fake (tests/support/gateway_stack.py).
"""

from __future__ import annotations

import contextlib
import gc
import socket
from typing import Any, Iterator

import httpx
import pytest

from tests.support.gateway_stack import GatewayStack
from tests.support.spy_tokenizer import SpyTokenizer, fresh_spied, gateway_with_spy

pytestmark = pytest.mark.integration

KEY_A = "key-a-" + "a" * 26
MAX_CHARS = 40


@pytest.fixture(scope="module")
def stack() -> Iterator[GatewayStack]:
    s = gateway_with_spy(api_key=[KEY_A], max_prompt_chars=MAX_CHARS, key_max_concurrent=1)
    yield s
    s.close()


@pytest.fixture
def fresh(stack: GatewayStack) -> GatewayStack:
    return fresh_spied(stack)


def _h(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def _post(stack: GatewayStack, key: str, body: dict[str, Any] | None = None,
          path: str = "/v1/completions") -> httpx.Response:
    body = body if body is not None else {"prompt": "hi", "max_tokens": 20}
    return httpx.post(stack.http_base + path, json=body, headers=_h(key), timeout=10)


def test_roles_and_the_templated_chat_prompt_are_held_to_the_caps(fresh: GatewayStack) -> None:
    """Only contents were counted: roles went into the template unbounded, and the templated text
    reached the tokenizer unchecked. A long role is refused before the template runs; a prompt the
    template makes longer than max_prompt_chars is refused before it is tokenised."""
    r = _post(fresh, KEY_A, {"messages": [{"role": "r" * 65, "content": "hi"}]}, path="/v1/chat/completions")
    assert r.status_code == 400 and "role has 65 characters" in r.json()["error"]["message"]
    assert SpyTokenizer.seen == []  # not even the template saw it
    roles = [{"role": "r" * 64, "content": "x" * 10}] * 3  # 30 characters of contents: within the cap
    r = _post(fresh, KEY_A, {"messages": roles}, path="/v1/chat/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    assert "chat template" in r.json()["error"]["message"] and "max_prompt_chars" in r.json()["error"]["message"]
    assert SpyTokenizer.seen == [30] and fresh.fake.submits == []  # templated (apply_chat), never encoded
    ok = _post(fresh, KEY_A, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20},
               path="/v1/chat/completions")
    assert ok.status_code == 200, ok.text  # "user: hi\nassistant:" fits


def test_a_huge_header_block_is_refused_and_the_gateway_stays_healthy(fresh: GatewayStack) -> None:
    """httptools read 100,000 headers (3 MB) before the key was checked; h11 stops at
    max_header_bytes (64 KiB) with a 400 and closes the connection."""
    head = (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY_A.encode() + b"\r\n"
            + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 20) for i in range(100_000)) + b"\r\n")
    sent, status = 0, None
    with socket.create_connection(("127.0.0.1", fresh.handle.http_port), timeout=10) as sock:
        try:
            while sent < len(head):
                sent += sock.send(head[sent:sent + 65536])
        except OSError:  # closed on us mid-way: what we want
            pass
        try:
            reply = sock.recv(4096)
            status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else None
        except OSError:  # reset: the gateway dropped the connection with our bytes unread
            pass
    assert status is None or 400 <= status < 500, status
    assert status is not None or sent < len(head)  # refused, or cut off before the block ended
    assert httpx.get(fresh.http_base + "/health", timeout=5).status_code == 200
    big = {"authorization": f"Bearer {KEY_A}", **{f"x-pad-{i}": "a" * 20 for i in range(500)}}  # ~15 KB: fine
    assert httpx.get(fresh.http_base + "/v1/models", headers=big, timeout=5).status_code == 200
    assert _post(fresh, KEY_A).status_code == 200


def test_a_stream_whose_body_is_never_iterated_is_cancelled_and_frees_its_place(fresh: GatewayStack) -> None:
    """An ASGI 2.4 server reports a client gone by raising OSError from ``send``: Starlette then
    never starts the SSE body, so no finally in it runs. The request must still be cancelled, its
    key's place freed (key_max_concurrent 1) and this gateway's note of the stream dropped."""
    body = b'{"prompt": "hi", "stream": true, "max_tokens": 20}'
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 9), "server": ("127.0.0.1", 80),
             "headers": [(b"authorization", f"Bearer {KEY_A}".encode()), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]}
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[int] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            sent.append(message["status"])
            raise OSError("the client is gone")

    async def call() -> None:
        with contextlib.suppress(Exception):  # Starlette's ClientDisconnect
            await fresh.handle._app(scope, receive, send)  # type: ignore[misc]

    gc.disable()  # no collector run may stand in for the clean-up
    try:
        fresh.loop.run(call())
        assert sent == [200] and len(fresh.fake.submits) == 1
        rid = fresh.fake.submits[0].request_id
        assert fresh.wait_for(lambda: rid in fresh.fake.cancels), "the never-read request was not cancelled"
        assert _post(fresh, KEY_A).status_code == 200  # concurrency=1: its place is free
    finally:
        gc.enable()


def test_a_stream_abandoned_before_its_first_byte_is_cancelled_and_frees_its_place(fresh: GatewayStack) -> None:
    """Over a real socket: a client that leaves while its Submit is in flight."""
    fresh.fake.submit_delay_s = 0.5
    body = b'{"prompt": "hi", "stream": true, "max_tokens": 20}'
    with socket.create_connection(("127.0.0.1", fresh.handle.http_port), timeout=5) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY_A.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
                     + body)
        assert fresh.wait_for(lambda: len(fresh.fake.submits) == 1)
    rid = fresh.fake.submits[0].request_id
    assert fresh.wait_for(lambda: rid in fresh.fake.cancels), "the abandoned request was not cancelled"
    fresh.fake.submit_delay_s = 0.0
    assert fresh.wait_for(lambda: _post(fresh, KEY_A).status_code == 200)  # concurrency=1: its place is free
