"""The OpenAI parameters beyond the basics, with the official `openai` client and over gRPC:
prompt lists, `n`, `stop` strings, `stop_token_ids` reasons, `logprobs`, usage in every case.

A scripted scheduler (``FakeScheduler``) makes each sample's output a function of its seed, and
(``LogprobScheduler``) attaches logprobs to its tokens as a worker would, so every number a
response carries is known in advance."""

from __future__ import annotations

import json
from typing import Any, AsyncGenerator, Iterator

import grpc
import httpx
import openai
import pytest

from accelgen.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, scheduler_pb2
from tests.support.gateway_stack import FakeScheduler, GatewayStack, scripted_logprobs

pytestmark = pytest.mark.integration

HELLO = "Hello, world!"


def enc(text: str) -> list[int]:
    return [3 + b for b in text.encode()]


def by_seed(request: scheduler_pb2.SubmitRequest) -> list[int]:
    """"seed N" for a seeded request, else the prompt echoed back."""
    sp = request.sampling_params
    return enc(f"seed {sp.seed}") if sp.HasField("seed") else list(request.prompt_token_ids)


class LogprobScheduler(FakeScheduler):
    """Each token t with logprob -0.25 and rank 2; its top: t + 1 (-0.125), t (-0.25), t + 2 (-1)."""

    async def _batches(self, request_id: str, start: int) -> AsyncGenerator[scheduler_pb2.TokenBatch, None]:
        k = self._requests[request_id].submit.sampling_params
        async for batch in super()._batches(request_id, start):
            if k.HasField("logprobs"):
                batch.logprobs.extend(scripted_logprobs(batch.token_ids, k.logprobs))
            yield batch


@pytest.fixture(scope="module")
def stack() -> Iterator[GatewayStack]:
    s = GatewayStack(LogprobScheduler(), reconnect_timeout_s=3.0)
    yield s
    s.close()


@pytest.fixture
def fresh(stack: GatewayStack) -> GatewayStack:
    stack.reset()
    return stack


@pytest.fixture
def client(fresh: GatewayStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=fresh.http_base + "/v1", api_key="x", max_retries=0, timeout=10)


def _sse(fresh: GatewayStack, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream("POST", fresh.http_base + path, json=body, timeout=10) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]


# ---- prompt lists and n ---------------------------------------------------------------------

def test_prompt_list_is_one_request_per_prompt_with_summed_usage(fresh: GatewayStack, client: openai.OpenAI) -> None:
    fresh.fake.tokens_for = by_seed
    reply = client.completions.create(model="fake-model", prompt=["ab", "cde"], max_tokens=5)
    assert [(c.index, c.text) for c in reply.choices] == [(0, "ab"), (1, "cde")]
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (5, 5, 10)
    reply = client.completions.create(model="fake-model", prompt=[[5, 6], [7]], max_tokens=5)
    assert [list(s.prompt_token_ids) for s in fresh.fake.submits[2:]] == [[5, 6], [7]]
    assert reply.usage.prompt_tokens == 3 and len({s.request_id for s in fresh.fake.submits}) == 4


def test_n_samples_use_seed_plus_index_and_count_the_prompt_once(fresh: GatewayStack,
                                                                 client: openai.OpenAI) -> None:
    fresh.fake.tokens_for = by_seed
    reply = client.completions.create(model="fake-model", prompt=["x", "yz"], n=3, seed=7, max_tokens=8)
    assert [(c.index, c.text) for c in reply.choices] == [(i, f"seed {7 + i % 3}") for i in range(6)]
    assert reply.usage.prompt_tokens == 1 + 2 and reply.usage.completion_tokens == 6 * 6
    chat = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "q"}], n=2,
                                          seed=1)
    assert [c.message.content for c in chat.choices] == ["seed 1", "seed 2"]
    assert chat.usage.prompt_tokens == len(fresh.fake.submits[-1].prompt_token_ids)
    assert chat.usage.completion_tokens == 12


def test_streamed_n_and_list_carry_indexes_and_usage(fresh: GatewayStack, client: openai.OpenAI) -> None:
    fresh.fake.tokens_for = by_seed
    fresh.fake.batch_size = 2
    chunks = list(client.completions.create(model="fake-model", prompt=["a", "b"], n=2, seed=3, stream=True,
                                            stream_options={"include_usage": True}))
    texts: dict[int, str] = {}
    for c in chunks[:-1]:
        texts[c.choices[0].index] = texts.get(c.choices[0].index, "") + c.choices[0].text
    assert texts == {0: "seed 3", 1: "seed 4", 2: "seed 3", 3: "seed 4"}
    assert sorted(c.choices[0].index for c in chunks[:-1] if c.choices[0].finish_reason == "stop") == [0, 1, 2, 3]
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 2
    assert chunks[-1].usage.completion_tokens == 24


def test_streamed_chat_n_opens_each_choice_with_its_role(fresh: GatewayStack, client: openai.OpenAI) -> None:
    fresh.fake.tokens_for = by_seed
    chunks = list(client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "q"}],
                                                 n=2, seed=5, stream=True))
    assert [(c.choices[0].index, c.choices[0].delta.role, c.choices[0].delta.content) for c in chunks[:2]] == \
        [(0, "assistant", ""), (1, "assistant", "")]
    for i, want in enumerate(["seed 5", "seed 6"]):
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i) == want


def test_leaving_an_n_stream_cancels_every_sample(fresh: GatewayStack) -> None:
    fresh.reset(token_delay_s=0.05)
    with httpx.stream("POST", fresh.http_base + "/v1/completions", headers={"x-request-id": "gone-n"},
                      json={"prompt": "hi", "n": 3, "stream": True}) as r:
        next(line for line in r.iter_lines() if line.startswith("data: "))
    ids = [s.request_id for s in fresh.fake.submits]
    assert len(ids) == 3 and fresh.wait_for(lambda: set(ids) <= set(fresh.fake.cancels))


# ---- stop strings and stop reasons ------------------------------------------------------------

def test_stop_string_cuts_the_text_and_cancels_at_the_scheduler(fresh: GatewayStack, client: openai.OpenAI) -> None:
    fresh.fake.batch_size = 4
    reply = client.completions.create(model="fake-model", prompt="hi", max_tokens=20, stop=[", w", "zz"])
    choice = reply.choices[0]
    assert (choice.text, choice.finish_reason, choice.model_extra["stop_reason"]) == ("Hello", "stop", ", w")
    assert reply.usage.completion_tokens == len("Hello, w")  # up to the token that completed it
    assert fresh.wait_for(lambda: fresh.fake.submits[0].request_id in fresh.fake.cancels)
    kept = client.completions.create(model="fake-model", prompt="hi", stop="o, ",
                                     extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == "Hello, " and kept.usage.completion_tokens == 7


def test_streamed_stop_string_is_never_sent(fresh: GatewayStack) -> None:
    events = _sse(fresh, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": True,
                                                   "stop": "world", "stream_options": {"include_usage": True}})
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert content == "Hello, "
    final = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]][-1]["choices"][0]
    assert (final["finish_reason"], final["stop_reason"]) == ("stop", "world")
    assert events[-1]["usage"]["completion_tokens"] == len("Hello, world")  # its "d" completed the stop string


def test_stop_token_id_is_the_stop_reason_and_adds_no_text(fresh: GatewayStack, client: openai.OpenAI) -> None:
    bang = enc("!")[0]
    reply = client.completions.create(model="fake-model", prompt="hi", extra_body={"stop_token_ids": [bang]})
    assert reply.choices[0].text == "Hello, world" and reply.choices[0].model_extra["stop_reason"] == bang
    assert reply.usage.completion_tokens == 13
    plain = client.completions.create(model="fake-model", prompt="hi")
    assert plain.choices[0].text == HELLO and plain.choices[0].model_extra["stop_reason"] is None


# ---- logprobs ---------------------------------------------------------------------------------

def test_completion_logprobs_streamed_and_not(fresh: GatewayStack, client: openai.OpenAI) -> None:
    reply = client.completions.create(model="fake-model", prompt="hi", max_tokens=3, logprobs=2)
    lp = reply.choices[0].logprobs
    assert lp.tokens == list(HELLO) and lp.token_logprobs == [-0.25] * 13
    assert lp.text_offset == list(range(13))
    h = HELLO[0]
    assert lp.top_logprobs[0] == {h: -0.25, chr(ord(h) + 1): -0.125}  # sampled first, then the top 2
    fresh.fake.batch_size = 5
    chunks = list(client.completions.create(model="fake-model", prompt="hi", logprobs=1, stream=True))
    assert [t for c in chunks for t in c.choices[0].logprobs.tokens] == list(HELLO)
    assert [o for c in chunks for o in c.choices[0].logprobs.text_offset] == list(range(13))
    assert fresh.fake.submits[0].sampling_params.logprobs == 2


def test_chat_logprobs_and_top_logprobs(fresh: GatewayStack, client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "x"}],
                                           logprobs=True, top_logprobs=2, stop=["o"])
    assert reply.choices[0].message.content == "Hell"
    content = reply.choices[0].logprobs.content
    assert [c.token for c in content] == list("Hello")  # the token that completed the stop string too
    assert [(t.token, t.logprob) for t in content[0].top_logprobs] == [("H", -0.25), ("I", -0.125)]
    assert content[0].bytes == [ord("H")]
    chunks = list(client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "x"}],
                                                 logprobs=True, stream=True))
    streamed = [c for ch in chunks if ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [c.token for c in streamed] == list(HELLO) and all(c.top_logprobs == [] for c in streamed)
    plain = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "x"}])
    assert plain.choices[0].logprobs is None and not fresh.fake.submits[-1].sampling_params.HasField("logprobs")


def test_bad_chat_logprobs_are_400(fresh: GatewayStack, client: openai.OpenAI) -> None:
    for extra, field in [({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21},
                                                                   "top_logprobs")]:
        r = httpx.post(fresh.http_base + "/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": "x"}], **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    assert fresh.fake.submits == []


def test_continuous_usage_stats_on_every_chunk(fresh: GatewayStack) -> None:
    fresh.fake.batch_size = 5
    events = _sse(fresh, "/v1/completions", {"prompt": "hi", "stream": True, "stream_options": {
        "include_usage": True, "continuous_usage_stats": True}})
    assert [e["usage"]["completion_tokens"] for e in events[:-1]] == [5, 10, 13]
    assert events[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 13, "total_tokens": 15}


# ---- gRPC Generate ---------------------------------------------------------------------------

@pytest.fixture
def stub(fresh: GatewayStack) -> Iterator[gateway_pb2_grpc.GatewayStub]:
    with grpc.insecure_channel(fresh.grpc_target) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


def test_grpc_n_stop_and_logprobs(fresh: GatewayStack, stub: gateway_pb2_grpc.GatewayStub) -> None:
    fresh.fake.tokens_for = by_seed
    sp = common_pb2.SamplingParams(temperature=1, seed=10, logprobs=1)
    call = stub.Generate(gateway_pb2.GenerateRequest(text="hi", n=2, stop=["0"], stream=True, sampling_params=sp),
                         timeout=10)
    out = list(call)
    ids = [v for k, v in call.initial_metadata() if k == "x-request-id"]
    completes = {r.complete.index: r for r in out if r.WhichOneof("response") == "complete"}
    assert sorted(completes) == [0, 1] and ids == [completes[0].request_id, completes[1].request_id]
    assert completes[0].complete.text == "seed 1" and completes[0].complete.stop_string == "0"
    assert completes[0].complete.completion_tokens == len("seed 10")
    assert completes[1].complete.text == "seed 11" and completes[1].complete.WhichOneof("stop_reason") is None
    chunks = [r.chunk for r in out if r.WhichOneof("response") == "chunk"]
    assert {c.index for c in chunks} == {0, 1}
    assert all(len(c.logprobs) == len(c.token_ids) for c in chunks)
    assert len(completes[1].complete.logprobs) == 7 and completes[1].complete.logprobs[0].rank == 2
    assert {s.sampling_params.seed for s in fresh.fake.submits} == {10, 11}


def test_grpc_non_streaming_n_and_stop_token_id(fresh: GatewayStack, stub: gateway_pb2_grpc.GatewayStub) -> None:
    bang = enc("!")[0]
    out = list(stub.Generate(gateway_pb2.GenerateRequest(
        text="hi", n=3, sampling_params=common_pb2.SamplingParams(temperature=1, stop_token_ids=[bang])), timeout=10))
    assert [r.complete.index for r in out] == [0, 1, 2]
    assert all(r.complete.text == "Hello, world" and r.complete.stop_token_id == bang for r in out)


@pytest.mark.parametrize("fields, needle", [
    (dict(n=129), "n = 129"),
    (dict(n=2, sampling_params=common_pb2.SamplingParams(temperature=0)), "greedy"),
    (dict(stop=["x"] * 17), "at most 16 stop strings"),
    (dict(stop=[""]), "stop[0] is empty"),
    (dict(stop=["x" * 257]), "at most 256"),
    (dict(sampling_params=common_pb2.SamplingParams(temperature=1, logprobs=21)), "sampling_params.logprobs"),
])
def test_grpc_bad_fields_are_invalid_argument(fresh: GatewayStack, stub: gateway_pb2_grpc.GatewayStub,
                                              fields: dict[str, Any], needle: str) -> None:
    fields.setdefault("sampling_params", common_pb2.SamplingParams(temperature=1))
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(gateway_pb2.GenerateRequest(text="hi", **fields), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()
    assert fresh.fake.submits == []
