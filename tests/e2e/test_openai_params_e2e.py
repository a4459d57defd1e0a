"""The OpenAI and gRPC generation parameters through the whole stack (Redis, scheduler, a sim
worker, gateway as processes): `n`, prompt lists, `stop` strings (finished as "stop" at the
scheduler, counted finished there, re-applied by Attach), and `logprobs` computed by the worker,
with the official `openai` client.

The sim worker samples from a 259-token vocabulary here, so its tokens are bytes the gateway's
byte tokenizer turns into text, and a stop string made of common ASCII letters turns up."""

from __future__ import annotations

import json
import string
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import grpc
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from accelgen.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from launcher.stack import Stack, start_stack

pytestmark = pytest.mark.e2e

STOPS = list(string.ascii_lowercase[:16])  # each of 16 letters: one turns up within ~16 tokens


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(workers=1, executor="sim", log_dir=tmp_path_factory.mktemp("params"),
                    worker_args=["--time-scale", "0.02", "--vocab-size", "259", "--log-level", "WARNING"],
                    scheduler_args=["--log-level", "WARNING"], gateway_args=["--log-level", "WARNING"])
    yield s
    s.stop()


@pytest.fixture
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{stack.http_port}/v1", api_key="x", max_retries=0, timeout=60)


def test_n_prompt_lists_and_logprobs(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=client.models.list().data[0].id, prompt=["one", "three"], n=2, max_tokens=6, logprobs=2,
                                      extra_body={"ignore_eos": True})
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert reply.usage.prompt_tokens == 3 + 5 and reply.usage.completion_tokens == 4 * 6
    for c in reply.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
        assert all(v < 0 for v in lp.token_logprobs) and all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    chunks = list(client.chat.completions.create(model=client.models.list().data[0].id, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=5, logprobs=True, top_logprobs=3, stream=True,
                                                 stream_options={"include_usage": True}))
    content = [c for ch in chunks if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert len(content) == chunks[-1].usage.completion_tokens and all(len(c.top_logprobs) == 3 for c in content)


def _scheduler_counts(stack: Stack) -> tuple[float, float]:
    """(requests finished with reason "stop", requests cancelled) in the scheduler's /metrics."""
    with urllib.request.urlopen(stack.metrics_urls["scheduler"], timeout=10) as resp:
        text = resp.read().decode()
    stopped = cancelled = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "accelgen_scheduler_requests_finished_total" and sample.labels["finish_reason"] == "stop":
                stopped += sample.value
            elif sample.name == "accelgen_scheduler_requests_cancelled_total":
                cancelled += sample.value
    return stopped, cancelled


def test_stop_string_ends_the_request_at_the_scheduler(stack: Stack, client: openai.OpenAI) -> None:
    stopped_before, cancelled_before = _scheduler_counts(stack)
    reply = client.completions.create(model=client.models.list().data[0].id, prompt="go", max_tokens=300, stop=STOPS,
                                      extra_body={"ignore_eos": True})
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and choice.model_extra["stop_reason"] in STOPS
    assert not any(s in choice.text for s in STOPS) and reply.usage.completion_tokens < 300
    rid = reply.id.removeprefix("cmpl-")
    with grpc.insecure_channel(stack.gateway_address) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        deadline = time.monotonic() + 30
        while (state := stub.GetRequest(common_pb2.GetRequestRequest(request_id=rid), timeout=5)).status != "finished":
            assert state.status in ("running", "waiting") and time.monotonic() < deadline, state.status
            time.sleep(0.1)
        # Finished as vLLM finishes it: "stop", exactly the tokens up to the one completing the string.
        assert state.finish_reason == "stop" and len(state.output_ids) == reply.usage.completion_tokens
        assert list(state.stop) == STOPS
        stopped, cancelled = _scheduler_counts(stack)
        assert (stopped - stopped_before, cancelled - cancelled_before) == (1, 0)
        # Attach (through any gateway) re-applies the stored stop strings: the same text and reason.
        out = list(stub.Attach(gateway_pb2.AttachRequest(request_id=rid), timeout=30))
        complete = out[-1].complete
        assert (complete.text, complete.finish_reason, complete.stop_string) == (
            choice.text, "stop", choice.model_extra["stop_reason"])
        assert len(complete.output_ids) == reply.usage.completion_tokens
        assert "".join(r.chunk.text for r in out[:-1]) == choice.text
    # So does the HTTP state read: the same text, not the stop string the kept tokens end with.
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.http_port}/v1/requests/{rid}", timeout=10) as resp:
        assert json.loads(resp.read())["text"] == choice.text


def test_grpc_n_with_logprobs(stack: Stack) -> None:
    req = gateway_pb2.GenerateRequest(text="hi", n=3, stream=True, sampling_params=common_pb2.SamplingParams(
        temperature=1, seed=3, max_new_tokens=4, ignore_eos=True, logprobs=1))
    with grpc.insecure_channel(stack.gateway_address) as ch:
        out = list(gateway_pb2_grpc.GatewayStub(ch).Generate(req, timeout=60))
    completes = [r.complete for r in out if r.WhichOneof("response") == "complete"]
    assert sorted(c.index for c in completes) == [0, 1, 2]
    assert all(len(c.logprobs) == len(c.output_ids) == 4 and len(c.logprobs[0].top) == 1 for c in completes)
