"""The OpenAI-compatible HTTP front end: the `openai` client, raw SSE, errors, SLO plumbing."""

from __future__ import annotations

import json
from typing import Any, Iterator

import grpc
import httpx
import openai
import pytest

from tests.support.gateway_stack import GatewayStack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack() -> Iterator[GatewayStack]:
    s = GatewayStack(reconnect_timeout_s=3.0, served_model_name="alias")
    yield s
    s.close()


@pytest.fixture
def fresh(stack: GatewayStack) -> GatewayStack:
    stack.reset()
    return stack


@pytest.fixture
def client(fresh: GatewayStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=fresh.http_base + "/v1", api_key="x", max_retries=0, timeout=10)


def _sse_events(response: httpx.Response) -> list[Any]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_openai_client_streams_a_completion(fresh: GatewayStack, client: openai.OpenAI) -> None:
    fresh.fake.batch_size = 4
    stream = client.completions.create(model="fake-model", prompt="Say hi", max_tokens=20, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == "Hello, world!"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 13
    assert chunks[-1].usage.prompt_tokens == len("Say hi")
    assert fresh.fake.submits[0].sampling_params.max_new_tokens == 20


def test_openai_client_gets_a_chat_completion(fresh: GatewayStack, client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="fake-model", temperature=0, seed=7,
                                           messages=[{"role": "system", "content": "be brief"},
                                                     {"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "Hello, world!" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "stop" and reply.model == "fake-model"
    assert reply.usage.completion_tokens == 13 and reply.id.startswith("chatcmpl-")
    sub = fresh.fake.submits[0]
    prompt = bytes(t - 3 for t in sub.prompt_token_ids).decode()
    assert prompt == "system: be brief\nuser: hi\nassistant:"
    assert sub.sampling_params.temperature == 0 and sub.sampling_params.seed == 7
    assert not sub.sampling_params.HasField("max_new_tokens")  # chat runs to the context by default


def test_openai_client_streams_chat(fresh: GatewayStack, client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="fake-model", stream=True, messages=[{"role": "user", "content": "x"}]))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello, world!"


def test_raw_sse_shape_matches_vllm(fresh: GatewayStack) -> None:
    body = {"model": "fake-model", "prompt": [5, 6, 7], "max_tokens": 13, "stream": True, "ignore_eos": True,
            "logprobs": None, "repetition_penalty": 1.0, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", fresh.http_base + "/v1/completions", json=body,
                      headers={"x-request-id": "bench-abc-0"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        rid = r.headers["x-request-id"]  # the gateway's id; the client's x-request-id is its label
        events = _sse_events(r)
    assert events[-1] == "[DONE]" and len(rid) == 32
    tokens = [e for e in events[:-1] if e["choices"]]
    assert all(e["object"] == "text_completion" and e["id"] == f"cmpl-{rid}" for e in tokens)
    assert "".join(e["choices"][0]["text"] for e in tokens) == "Hello, world!"
    assert events[-2]["usage"] == {"prompt_tokens": 3, "completion_tokens": 13, "total_tokens": 16}
    sub = fresh.fake.submits[0]
    assert (sub.request_id, sub.label) == (rid, "bench-abc-0") and sub.sampling_params.ignore_eos
    assert list(sub.prompt_token_ids) == [5, 6, 7]


def test_models_and_health(fresh: GatewayStack, client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["fake-model"] and models[0].root == "fake-model"
    assert httpx.get(fresh.http_base + "/health").status_code == 200


@pytest.mark.parametrize("body, field", [
    ({"prompt": ["one", 2]}, "prompt"),
    ({"prompt": [[5], []]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "top_p": 0.0001 - 1}, "top_p"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": "hi", "n": 129}, "n"),
    ({"prompt": ["a"] * 65, "n": 2}, "n"),  # 130 choices
    ({"prompt": "hi", "n": 2, "temperature": 0}, "n"),  # vLLM: greedy samples would all be the same
    ({"prompt": "hi", "n": 2, "seed": 2**63 - 1}, "seed"),
    ({"prompt": "hi", "best_of": 2}, "best_of"),
    ({"prompt": "hi", "stop": [""]}, "stop"),
    ({"prompt": "hi", "stop": 5}, "stop"),
    ({"prompt": "hi", "stop": ["x"] * 17}, "stop"),
    ({"prompt": "hi", "stop": "x" * 257}, "stop"),
    ({"prompt": "hi", "include_stop_str_in_output": "yes"}, "include_stop_str_in_output"),
    ({"prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"prompt": "hi", "logprobs": -1}, "logprobs"),
    ({"prompt": "hi", "stream": True, "stream_options": {"continuous_usage_stats": "x", "include_usage": True}},
     "continuous_usage_stats"),
    ({"prompt": "hi", "app_class": "poetry"}, "app_class"),
    ({"prompt": "hi", "slo_ttft_ms": 500}, "slo_tbt_ms"),
    ({"prompt": "x" * 100}, "prompt"),
    # values no protobuf field can carry: a 400, not a 500 from building the message
    ({"prompt": "hi", "max_tokens": 2**31}, "max_tokens"),
    ({"prompt": "hi", "top_k": 2**31}, "top_k"),
    ({"prompt": "hi", "seed": 2**63}, "seed"),
    ({"prompt": [2**32]}, "prompt"),
    ({"prompt": "hi", "stop_token_ids": [2**32]}, "stop_token_ids"),
    ({"prompt": "hi", "temperature": 10**400}, "temperature"),
    # what vLLM refuses rather than silently changes or ignores
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "top_p": 1e-50}, "top_p"),
    ({"prompt": "hi", "min_p": 0.1}, "min_p"),
    ({"prompt": "hi", "response_format": {"type": "json_object"}}, "response_format"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "hi", "max_tokens": 100}, "max_tokens"),  # 2 + 100 tokens > the fake's 64-token context
])
def test_bad_completion_input_is_400_naming_the_field(fresh: GatewayStack, body, field) -> None:
    r = httpx.post(fresh.http_base + "/v1/completions", json={"model": "fake-model", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert field in err["message"] and err["param"] == field and err["code"] == 400
    assert fresh.fake.submits == []


def test_model_may_be_omitted_or_name_what_is_served_and_nothing_else(fresh: GatewayStack,
                                                                     client: openai.OpenAI) -> None:
    url = fresh.http_base + "/v1/completions"
    assert httpx.post(url, json={"prompt": "hi", "max_tokens": 2}).status_code == 200  # no model: the served one
    assert httpx.post(url, json={"model": "alias", "prompt": "hi", "max_tokens": 2}).status_code == 200
    with pytest.raises(openai.NotFoundError, match="gpt-4"):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    r = httpx.post(url, json={"model": ["fake-model"], "prompt": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    assert len(fresh.fake.submits) == 2


def test_bad_chat_input_and_bad_json(fresh: GatewayStack, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="fake-model", messages=[])
    r = httpx.post(fresh.http_base + "/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(fresh.http_base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]})
    assert r.status_code == 400 and "image_url" in r.json()["error"]["message"]
    r = httpx.post(fresh.http_base + "/v1/completions", content=b"[" * 100_000 + b"]" * 100_000,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "nested" in r.json()["error"]["message"]
    # a lone surrogate is legal JSON but no Unicode text (sent raw: httpx cannot encode it)
    r = httpx.post(fresh.http_base + "/v1/completions", content=rb'{"prompt": "\ud800"}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(fresh.http_base + "/v1/chat/completions",
                   content=rb'{"messages": [{"role": "user", "content": "\ud800"}]}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content"
    assert fresh.fake.submits == []


@pytest.mark.parametrize("code, status", [(grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
                                          (grpc.StatusCode.UNAVAILABLE, 503),
                                          (grpc.StatusCode.INVALID_ARGUMENT, 400)])
def test_scheduler_errors_map_to_http(fresh: GatewayStack, code, status) -> None:
    fresh.fake.submit_error = (code, "no profile meets a 1 ms TBT")
    r = httpx.post(fresh.http_base + "/v1/completions", json={"model": "fake-model", "prompt": "hi", "stream": True})
    assert r.status_code == status and r.json()["error"]["message"] == "no profile meets a 1 ms TBT"


def test_admission_refusal_is_a_429_with_retry_after(fresh: GatewayStack) -> None:
    fresh.fake.submit_error = (grpc.StatusCode.RESOURCE_EXHAUSTED, "the SLO of class 'chat' cannot be met now")
    fresh.fake.submit_retry_after_ms = 2500
    r = httpx.post(fresh.http_base + "/v1/completions", json={"model": "fake-model", "prompt": "hi"})
    assert r.status_code == 429 and r.headers["retry-after"] == "3"  # whole seconds, rounded up
    assert "cannot be met" in r.json()["error"]["message"]


def test_slo_from_headers_and_extra_body(fresh: GatewayStack, client: openai.OpenAI) -> None:
    client.completions.create(model="fake-model", prompt="a", extra_headers={
        "x-accelgen-app-class": "code", "x-accelgen-slo-ttft-ms": "900", "x-accelgen-slo-tbt-ms": "150"})
    client.completions.create(model="fake-model", prompt="b", extra_body={"app_class": "batch", "slo_jct_ms": 60_000})
    client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "c"}],
                                   extra_body={"app_class": "summarization", "top_k": 5, "stop_token_ids": [9]},
                                   extra_headers={"x-accelgen-app-class": "code"})  # the body wins
    by_header, by_body, chat = fresh.fake.submits
    assert (by_header.app_class, by_header.slo.ttft_ms, by_header.slo.tbt_ms) == ("code", 900, 150)
    assert (by_body.app_class, by_body.slo.jct_ms, by_body.slo.tbt_ms) == ("batch", 60_000, 0)
    assert chat.app_class == "summarization" and chat.slo.tbt_ms == pytest.approx(500)
    assert chat.sampling_params.top_k == 5 and list(chat.sampling_params.stop_token_ids) == [9]


def test_stream_resumes_after_scheduler_restart(fresh: GatewayStack) -> None:
    fresh.reset(token_delay_s=0.03)
    with httpx.stream("POST", fresh.http_base + "/v1/completions",
                      json={"model": "fake-model", "prompt": "hi", "stream": True}) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        fresh.restart_scheduler(down_s=0.3)
        rest = [line for line in lines if line.startswith("data: ")]
    payloads = [json.loads(x.removeprefix("data: ")) for x in [first] + rest[:-1]]
    assert "".join(p["choices"][0]["text"] for p in payloads) == "Hello, world!" and rest[-1] == "data: [DONE]"


def test_http_disconnect_cancels_at_the_scheduler(fresh: GatewayStack) -> None:
    fresh.reset(token_delay_s=0.05)
    with httpx.stream("POST", fresh.http_base + "/v1/completions",
                      json={"model": "fake-model", "prompt": "hi", "stream": True}, headers={"x-request-id": "gone-http"}) as r:
        next(line for line in r.iter_lines() if line.startswith("data: "))
    assert fresh.wait_for(lambda: fresh.fake.cancelled("gone-http"))


@pytest.mark.vllm
def test_vllm_benchmark_client_reads_the_stream(fresh: GatewayStack) -> None:
    """vLLM's own benchmark request function (backend "vllm"/"openai") against the gateway."""
    import asyncio

    aiohttp = pytest.importorskip("aiohttp")
    erf = pytest.importorskip("vllm.benchmarks.lib.endpoint_request_func")
    fresh.fake.batch_size = 2

    async def one() -> Any:
        async with aiohttp.ClientSession() as session:
            inp = erf.RequestFuncInput(prompt="some prompt", api_url=fresh.http_base + "/v1/completions",
                                       prompt_len=11, output_len=13, model="fake-model", ignore_eos=True,
                                       request_id="bench-1234-0")
            return await erf.ASYNC_REQUEST_FUNCS["vllm"](inp, session)

    out = asyncio.run(one())
    assert out.success, out.error
    assert out.generated_text == "Hello, world!" and out.output_tokens == 13 and out.prompt_len == 11
    assert out.ttft > 0 and len(out.itl) == 6  # 7 token chunks of <= 2 tokens
    assert fresh.fake.submits[0].sampling_params.ignore_eos


def test_non_streaming_client_gone_cancels_at_the_scheduler(fresh: GatewayStack) -> None:
    fresh.reset(token_delay_s=0.1)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(fresh.http_base + "/v1/chat/completions", timeout=0.3, headers={"x-request-id": "gone-full"},
                   json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]})
    assert fresh.wait_for(lambda: fresh.fake.cancelled("gone-full"))
