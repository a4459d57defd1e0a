"""Gateway -> scheduler -> vLLM workers: greedy outputs equal ``vllm.LLM.generate`` token for token.

Two real vLLM CPU workers serve the seeded tiny OPT with a deliberately small KV pool and a
256-token plan limit, so the scheduler must chunk long prompts, preempt and recompute, and
reuse freed blocks; the last test SIGKILLs a worker mid-generation and the survivor recomputes
its requests. Every output must still equal vLLM's own.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import time
from pathlib import Path

import grpc
import pytest

from launcher.stack import Stack, start_stack
from accelgen.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from tests.support.vllm_support import load_make_test_model, prompt_ids, vllm_reference

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

OUT = 96  # output tokens per request (the reference generates this many)
PROMPTS = {f"p{i}": prompt_ids(100 + i, n) for i, n in enumerate([700, 40, 90, 300, 150, 60, 500, 220, 120, 80, 30, 400])}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("vllm")
    return load_make_test_model().make_test_model(tmp_path_factory.mktemp("model") / "tiny-opt", seed=0)


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> dict[str, list[int]]:
    names = sorted(PROMPTS)
    sampling = {"max_tokens": OUT, "temperature": 0.0, "ignore_eos": True}
    outs = vllm_reference(model_dir, [{"prompt": PROMPTS[n], "sampling": sampling} for n in names])
    return dict(zip(names, outs))


@pytest.fixture(scope="module")
def stack(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    s = start_stack(workers=2, executor="vllm", log_dir=tmp_path_factory.mktemp("logs"),
                    worker_args=["--model", str(model_dir), "--dtype", "float32", "--num-blocks", "12", "--max-model-len", "1024",
                                 "--max-num-batched-tokens", "256", "--log-level", "WARNING"],
                    # vLLM's own policy admits on the first chunk alone, so a tight pool forces preemptions.
                    scheduler_args=["--policy", "vllm", "--heartbeat-interval-s", "0.5", "--heartbeat-ttl-s", "3",
                                    "--log-level", "WARNING"],
                    gateway_args=["--log-level", "WARNING"], worker_timeout_s=300)
    yield s
    s.stop()


def generate(address: str, name: str, max_tokens: int = OUT, on_first=None) -> tuple[str, list[int]]:
    req = gateway_pb2.GenerateRequest(
        request_id=f"{name}-{time.monotonic_ns()}", tokenized=common_pb2.TokenizedInput(input_ids=PROMPTS[name]),
        sampling_params=common_pb2.SamplingParams(max_new_tokens=max_tokens, ignore_eos=True, temperature=0.0),
        app_class="chat", stream=True)
    tokens: list[int] = []
    request_id = ""  # the gateway's id (the one above is only the client's label)
    with grpc.insecure_channel(address) as ch:
        for resp in gateway_pb2_grpc.GatewayStub(ch).Generate(req, timeout=300):
            request_id = resp.request_id
            if resp.HasField("chunk"):
                tokens.extend(resp.chunk.token_ids)
                if on_first is not None and tokens:
                    on_first()
                    on_first = None
    return request_id, tokens


def preemptions(address: str, request_id: str) -> int:
    with grpc.insecure_channel(address) as ch:
        state = scheduler_pb2_grpc.SchedulerStub(ch).GetRequest(common_pb2.GetRequestRequest(request_id=request_id),
                                                                timeout=10)
    return state.num_preemptions


def test_long_prompt_chunked_while_others_join_and_leave(stack: Stack, reference: dict[str, list[int]]) -> None:
    # p0 (700 tokens) needs three 256-token plans; short requests start and finish meanwhile.
    with cf.ThreadPoolExecutor(max_workers=6) as pool:
        futures = {"p0": pool.submit(generate, stack.gateway_address, "p0")}
        for name, max_tokens in (("p1", 8), ("p2", 30), ("p5", OUT)):
            time.sleep(0.05)
            futures[name] = pool.submit(generate, stack.gateway_address, name, max_tokens)
        results = {n: f.result(timeout=300)[1] for n, f in futures.items()}
    for name, tokens in results.items():
        assert tokens == reference[name][:len(tokens)] and len(tokens) in (8, 30, OUT), name


def test_preempted_requests_recompute_to_the_same_output(stack: Stack, reference: dict[str, list[int]]) -> None:
    # Twelve requests (3,842 tokens with their outputs) on two workers of 11 usable blocks (1,408
    # tokens) each do not fit at once:
    # decodes run out of blocks and requests are preempted and recomputed.
    with cf.ThreadPoolExecutor(max_workers=12) as pool:
        futures = {n: pool.submit(generate, stack.gateway_address, n) for n in PROMPTS}
        results = {n: f.result(timeout=300) for n, f in futures.items()}
    for name, (_, tokens) in results.items():
        assert tokens == reference[name], name
    assert sum(preemptions(stack.scheduler_address, rid) for rid, _ in results.values()) > 0


def test_freed_blocks_are_reused_by_new_requests(stack: Stack, reference: dict[str, list[int]]) -> None:
    # Sequential requests, each larger than what is left after the previous one unless its
    # blocks were freed and handed out again.
    for name in ("p6", "p11", "p3"):
        assert generate(stack.gateway_address, name)[1] == reference[name], name


def test_killed_worker_requests_recompute_on_the_other(stack: Stack, reference: dict[str, list[int]]) -> None:
    started = cf.Future()
    names = ["p4", "p7", "p8", "p9", "p10", "p2"]
    with cf.ThreadPoolExecutor(max_workers=len(names)) as pool:
        futures = {n: pool.submit(generate, stack.gateway_address, n, OUT,
                                  (lambda: started.done() or started.set_result(True))) for n in names}
        started.result(timeout=120)
        stack.find("worker-0").kill()  # SIGKILL mid-generation
        results = {n: f.result(timeout=300)[1] for n, f in futures.items()}
    for name, tokens in results.items():
        assert tokens == reference[name], name
    with grpc.insecure_channel(stack.scheduler_address) as ch:
        info = scheduler_pb2_grpc.SchedulerStub(ch).GetServerInfo(scheduler_pb2.GetServerInfoRequest(), timeout=10)
    assert info.live_workers == 1
