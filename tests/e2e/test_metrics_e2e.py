"""Prometheus metrics of a real stack (Redis, scheduler, two sim workers, gateway as processes):
a small mixed-class load, then ``/metrics`` of the gateway, the scheduler and a worker parsed with
prometheus_client's own parser, and ``accelgen top --once`` against the scheduler."""

from __future__ import annotations

import concurrent.futures as cf
import subprocess
import sys
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from accelgen.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from launcher.stack import Stack, start_stack

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["chat", "code", "summarization", "batch"]
LOAD = [CLASSES[i % 4] for i in range(12)]  # 3 requests per class


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    s = start_stack(workers=2, executor="sim", worker_args=["--time-scale", "0.02", "--log-level", "WARNING"],
                    scheduler_args=["--log-level", "WARNING"], gateway_args=["--log-level", "WARNING"],
                    log_dir=tmp_path_factory.mktemp("metrics-stack"))
    yield s
    s.stop()


def generate(address: str, app_class: str, max_tokens: int = 12) -> gateway_pb2.GenerateComplete:
    req = gateway_pb2.GenerateRequest(tokenized=common_pb2.TokenizedInput(input_ids=[7] * 24),
                                      sampling_params=common_pb2.SamplingParams(max_new_tokens=max_tokens,
                                                                                ignore_eos=True),
                                      app_class=app_class, stream=True)
    complete = None
    with grpc.insecure_channel(address) as ch:
        for resp in gateway_pb2_grpc.GatewayStub(ch).Generate(req, timeout=120):
            if resp.HasField("complete"):
                complete = resp.complete
    assert complete is not None
    return complete


def scrape(url: str) -> dict[str, list]:
    """Family name -> its samples, from the Prometheus text format."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def by(samples: list, name: str, label: str, **where: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in where.items()):
            out[s.labels[label]] = out.get(s.labels[label], 0.0) + s.value
    return out


@pytest.fixture(scope="module")
def loaded(stack: Stack) -> Stack:
    """The stack after the load: 12 finished requests (3 per class) and one refused at validation."""
    with cf.ThreadPoolExecutor(len(LOAD)) as pool:
        list(pool.map(lambda c: generate(stack.gateway_address, c), LOAD))
    with pytest.raises(grpc.RpcError) as err:  # max_new_tokens beyond the context: INVALID_ARGUMENT
        generate(stack.gateway_address, "chat", max_tokens=10**6)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return stack


def test_scheduler_metrics_after_a_mixed_load(loaded: Stack) -> None:
    m = scrape(loaded.metrics_urls["scheduler"])
    P = "accelgen_scheduler_"
    sent = Counter(LOAD)
    assert by(m[P + "requests_finished"], P + "requests_finished_total", "app_class") == sent
    met = by(m[P + "requests_slo_met"], P + "requests_slo_met_total", "app_class")
    assert all(0 <= met.get(c, 0) <= sent[c] for c in CLASSES)
    assert by(m[P + "output_tokens"], P + "output_tokens_total", "app_class") == {c: 12 * n for c, n in sent.items()}
    ttft = by(m[P + "time_to_first_token_seconds"], P + "time_to_first_token_seconds_count", "app_class")
    tbt = by(m[P + "inter_token_latency_seconds"], P + "inter_token_latency_seconds_count", "app_class")
    assert ttft == sent and tbt == {c: 11 * n for c, n in sent.items()}  # one TTFT and 11 gaps per request
    assert set(by(m[P + "requests_waiting"], P + "requests_waiting", "app_class")) == set(CLASSES)
    assert by(m[P + "requests_running"], P + "requests_running", "app_class") == dict.fromkeys(CLASSES, 0)
    workers = {"worker-0", "worker-1"}
    used = by(m[P + "kv_blocks_used"], P + "kv_blocks_used", "worker")
    free = by(m[P + "kv_blocks_free"], P + "kv_blocks_free", "worker")
    total = by(m[P + "kv_blocks_total"], P + "kv_blocks_total", "worker")
    assert set(used) == set(free) == set(total) == workers
    assert all(used[w] + free[w] == total[w] > 0 for w in workers)
    assert by(m[P + "worker_up"], P + "worker_up", "worker") == dict.fromkeys(workers, 1.0)
    assert by(m[P + "worker_draining"], P + "worker_draining", "worker") == dict.fromkeys(workers, 0.0)
    assert m[P + "workers_registered"][0].value == 2
    iterations = by(m[P + "iteration_seconds"], P + "iteration_seconds_count", "worker")
    assert sum(iterations.values()) > 0
    assert sum(by(m[P + "decision_seconds"], P + "decision_seconds_count", "worker").values()) > 0
    assert sum(by(m[P + "overhead_seconds"], P + "overhead_seconds_count", "worker").values()) > 0
    attainment = by(m[P + "slo_attainment_ratio"], P + "slo_attainment_ratio", "app_class")
    assert set(attainment) == set(CLASSES) and all(0 <= v <= 1 for v in attainment.values())
    hops = by(m[P + "hop_latency_seconds"], P + "hop_latency_seconds", "hop", quantile="0.99")
    assert set(hops) == {"worker_to_scheduler", "applied_to_durable", "applied_to_gateway"}
    assert all(v >= 0 for v in hops.values())
    refused = by(m[P + "requests_refused"], P + "requests_refused_total", "code")
    assert "INVALID_ARGUMENT" not in refused  # the gateway refused that one: it never reached the scheduler


def test_worker_metrics_after_a_mixed_load(loaded: Stack) -> None:
    P = "accelgen_worker_"
    plans = 0.0
    for name in ("worker-0", "worker-1"):
        m = scrape(loaded.metrics_urls[name])
        assert by(m[P + "kv_blocks_total"], P + "kv_blocks_total", "worker")[name] > 0
        assert by(m[P + "registered"], P + "registered", "worker") == {name: 1.0}
        assert m[P + "info"][0].labels["executor"] == "sim"
        ok = by(m[P + "plans"], P + "plans_total", "code").get("OK", 0.0)
        timed = next(s.value for s in m[P + "iteration_seconds"] if s.name == P + "iteration_seconds_count")
        assert timed == ok  # one model time per plan run
        plans += ok
    assert plans > 0  # the load ran on the workers


def test_gateway_metrics_need_no_key_and_count_outcomes(loaded: Stack) -> None:
    reply = httpx.get(loaded.metrics_urls["gateway"], timeout=10)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    m = {f.name: f.samples for f in text_string_to_metric_families(reply.text)}
    P = "accelgen_gateway_"
    assert by(m[P + "requests"], P + "requests_total", "app_class", outcome="finished") == Counter(LOAD)
    assert by(m[P + "requests"], P + "requests_total", "code", outcome="error") == {"INVALID_ARGUMENT": 1}
    assert by(m[P + "time_to_first_token_seconds"], P + "time_to_first_token_seconds_count",
              "app_class") == Counter(LOAD)


def test_accelgen_top_once_shows_classes_and_workers(loaded: Stack) -> None:
    url = loaded.metrics_urls["scheduler"]
    out = subprocess.run([sys.executable, "-m", "launcher.cli", "top", "--once", "--scheduler-metrics", url],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for c in CLASSES:
        row = next(line for line in lines if line.startswith(c + " "))
        assert row.split()[1] == "3"  # finished
    assert any(line.startswith("worker-0") for line in lines) and any(line.startswith("worker-1") for line in lines)


def test_accelgen_top_without_a_scheduler_is_one_line() -> None:
    out = subprocess.run([sys.executable, "-m", "launcher.cli", "top", "--once", "--scheduler-metrics",
                          "http://127.0.0.1:9/metrics"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode != 0
    assert out.stdout == "" and len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr and "cannot read http://127.0.0.1:9/metrics" in out.stderr
