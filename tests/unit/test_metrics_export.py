"""The Prometheus metrics of each service, fed by hand and read back through the text format
(what a scrape returns), and the arithmetic of ``accelgen top``."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from accelgen.common.metrics_http import render, start_metrics_server
from accelgen.core.plan import BatchPlan
from accelgen.core.request import FinishReason, Request, RequestStatus, SamplingParams
from accelgen.core.scheduler import StepOutcome, TokenEvent
from accelgen.core.slo import SLOCatalog
from accelgen.core.worker_info import WorkerInfo
from gateway.errors import GatewayError
from gateway.metrics import GatewayMetrics, counts_failures
from launcher.top import frame, parse, quantile
from scheduler_service.metrics import LaneView, SchedulerMetrics, StateSource
from worker_service.metrics import WorkerMetrics
from worker_service.plan import ExecResult, WorkerPlan


def samples(registry) -> dict[tuple[str, tuple], float]:
    """Every sample of a scrape by (name, sorted labels), parsed from the text format."""
    out = {}
    for family in text_string_to_metric_families(render(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def request(rid: str, app_class: str = "chat", arrival: float = 100.0) -> Request:
    catalog = SLOCatalog()
    return Request(rid, [1, 2, 3], SamplingParams(max_tokens=8), catalog.get(app_class).slo, app_class, arrival)


def finish(r: Request, at: float, reason: FinishReason = FinishReason.LENGTH) -> Request:
    r.status, r.finish_s, r.finish_reason = RequestStatus.FINISHED, at, reason
    return r


def test_scheduler_counts_finishes_and_slo_with_the_load_rule() -> None:
    m = SchedulerMetrics(SLOCatalog())
    lane = m.lane("w0")
    fast, slow = request("fast"), request("slow")
    m.accepted(fast)
    m.accepted(slow)
    requests = {"fast": fast, "slow": slow}
    # chat: TTFT 1 s, TBT 50 ms. fast: first token at +0.2 s, then every 20 ms; slow: first token at +2 s.
    lane.applied(BatchPlan(1), StepOutcome(tokens=[TokenEvent("fast", 5, 0, 100.2), TokenEvent("slow", 5, 0, 102.0)]),
                 requests, 102.0)
    lane.applied(BatchPlan(2, preempted_request_ids=["x"]),
                 StepOutcome(tokens=[TokenEvent("fast", 6, 1, 100.22), TokenEvent("slow", 6, 1, 102.02)],
                             finished=[finish(fast, 100.22), finish(slow, 102.02)]), requests, 102.02)
    lane.decided(0.0004)
    lane.timed(0.02, 0.001)
    s = samples(m.registry)
    P = "accelgen_scheduler_"
    assert s[(P + "requests_finished_total", (("app_class", "chat"), ("finish_reason", "length")))] == 2
    assert s[(P + "requests_slo_met_total", (("app_class", "chat"),))] == 1
    assert s[(P + "goodput_tokens_total", (("app_class", "chat"),))] == 2  # the met request's tokens
    assert s[(P + "on_time_tokens_total", (("app_class", "chat"),))] == 2  # slow's stream started late
    assert s[(P + "output_tokens_total", (("app_class", "chat"),))] == 4
    assert s[(P + "time_to_first_token_seconds_count", (("app_class", "chat"),))] == 2
    assert s[(P + "time_to_first_token_seconds_bucket", (("app_class", "chat"), ("le", "0.3")))] == 1
    assert s[(P + "inter_token_latency_seconds_count", (("app_class", "chat"),))] == 2
    assert s[(P + "preemptions_total", (("worker", "w0"),))] == 1
    assert s[(P + "iterations_total", (("worker", "w0"),))] == 2
    assert s[(P + "decision_seconds_count", (("worker", "w0"),))] == 1
    assert s[(P + "overhead_seconds_sum", (("worker", "w0"),))] == pytest.approx(0.001)
    assert m.recent_attainment(102.1) == {"chat": (0.5, 2)}


def test_scheduler_cancel_refusal_and_unknown_class_labels() -> None:
    m = SchedulerMetrics(SLOCatalog())
    r = request("c", "code")
    m.accepted(r)
    m.cancelled_request("c")
    m.cancelled_request("c")  # once
    m.refused_submit("code", "RESOURCE_EXHAUSTED")
    m.refused_submit("made-up-class", "INVALID_ARGUMENT")  # bounded label values
    s = samples(m.registry)
    P = "accelgen_scheduler_"
    assert s[(P + "requests_cancelled_total", (("app_class", "code"),))] == 1
    assert s[(P + "requests_refused_total", (("app_class", "code"), ("code", "RESOURCE_EXHAUSTED")))] == 1
    assert s[(P + "requests_refused_total", (("app_class", "other"), ("code", "INVALID_ARGUMENT")))] == 1


def test_scheduler_gauges_are_read_from_the_lanes_at_scrape_time() -> None:
    waiting, running = request("a", "chat"), request("b", "batch")
    running.status = RequestStatus.RUNNING
    lanes = [LaneView("w0", [waiting, running], kv_total=100, kv_free=75, up=True, overhead_ewma_s=0.002),
             LaneView("w1", [], kv_total=50, kv_free=50, up=False, overhead_ewma_s=0.0, draining=True)]
    m = SchedulerMetrics(SLOCatalog(), state=StateSource(lanes=lambda: lanes, orphans=lambda: [request("o", "code")],
                                                         classes=lambda: SLOCatalog().names))
    s = samples(m.registry)
    P = "accelgen_scheduler_"
    assert s[(P + "kv_blocks_used", (("worker", "w0"),))] == 25
    assert s[(P + "kv_blocks_free", (("worker", "w1"),))] == 50
    assert s[(P + "kv_cache_usage_ratio", (("worker", "w0"),))] == 0.25
    assert s[(P + "worker_up", (("worker", "w1"),))] == 0
    assert s[(P + "worker_draining", (("worker", "w1"),))] == 1 and s[(P + "worker_draining", (("worker", "w0"),))] == 0
    assert s[(P + "workers_registered", ())] == 2
    assert s[(P + "requests_waiting", (("app_class", "chat"),))] == 1
    assert s[(P + "requests_waiting", (("app_class", "code"),))] == 1  # waiting for a worker
    assert s[(P + "requests_waiting", (("app_class", "summarization"),))] == 0  # every class, even empty
    assert s[(P + "requests_running", (("app_class", "batch"),))] == 1
    lanes.pop()  # the next scrape sees the registry as it is then
    assert (P + "kv_blocks_used", (("worker", "w1"),)) not in samples(m.registry)


def test_worker_metrics() -> None:
    info = WorkerInfo(model="m", executor="sim", block_size=16, num_blocks=101, max_model_len=2048, profile_json="",
                      eos_token_id=2, vocab_size=1000)
    m = WorkerMetrics("w0", info)
    m.done(WorkerPlan(1, "e"), ExecResult(1, {"r": 5}, 0.012))
    assert m.failed((grpc.StatusCode.INVALID_ARGUMENT, "bad")) == (grpc.StatusCode.INVALID_ARGUMENT, "bad")
    s = samples(m.registry)
    P = "accelgen_worker_"
    assert s[(P + "plans_total", (("code", "OK"),))] == 1
    assert s[(P + "plans_total", (("code", "INVALID_ARGUMENT"),))] == 1
    assert s[(P + "iteration_seconds_count", ())] == 1
    assert s[(P + "sampled_tokens_total", ())] == 1
    assert s[(P + "kv_blocks_total", (("worker", "w0"),))] == 100
    assert s[(P + "up", (("worker", "w0"),))] == 1
    assert s[(P + "registered", (("worker", "w0"),))] == 0


def test_gateway_counts_one_outcome_per_request() -> None:
    m = GatewayMetrics(lambda: ("chat", "code"))
    done = m.meter("chat", arrival_s=0.0)
    done.tokens(3)
    done.finished(slo_met=True)
    done.abandoned()  # after the end: nothing more
    left = m.meter("code", arrival_s=0.0)
    left.abandoned()
    left.failed(RuntimeError("late"))
    m.failed("nope", GatewayError(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy"))
    s = samples(m.registry)
    P = "accelgen_gateway_"
    assert s[(P + "requests_total", (("app_class", "chat"), ("code", "OK"), ("outcome", "finished")))] == 1
    assert s[(P + "requests_slo_met_total", (("app_class", "chat"),))] == 1
    assert s[(P + "requests_total", (("app_class", "code"), ("code", "CANCELLED"), ("outcome", "cancelled")))] == 1
    assert s[(P + "requests_total", (("app_class", "other"), ("code", "RESOURCE_EXHAUSTED"),
                                     ("outcome", "refused")))] == 1
    assert s[(P + "time_to_first_token_seconds_count", (("app_class", "chat"),))] == 1
    assert s[(P + "output_tokens_total", (("app_class", "chat"),))] == 3
    assert len([k for k in s if k[0] == P + "requests_total"]) == 3


def test_counts_failures_decorator_counts_and_reraises() -> None:
    class Service:
        metrics = GatewayMetrics(lambda: ("chat",))

        @counts_failures(lambda service, cls: cls)
        async def step(self, cls: str) -> str:
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, "bad max_tokens", "max_tokens")

    with pytest.raises(GatewayError):
        asyncio.run(Service().step("chat"))
    s = samples(Service.metrics.registry)
    assert s[("accelgen_gateway_requests_total", (("app_class", "chat"), ("code", "INVALID_ARGUMENT"),
                                                  ("outcome", "error")))] == 1


def test_metrics_http_server_serves_only_metrics() -> None:
    m = SchedulerMetrics(SLOCatalog())
    m.refused_submit("chat", "UNAVAILABLE")

    async def scrape() -> tuple[str, int]:
        server = await start_metrics_server(m.registry, "127.0.0.1", 0)
        try:
            get = lambda path: urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5)  # noqa: E731
            body = (await asyncio.to_thread(get, "/metrics")).read().decode()
            try:
                await asyncio.to_thread(get, "/other")
                status = 200
            except urllib.error.HTTPError as exc:
                status = exc.code
            return body, status
        finally:
            await server.stop()

    body, status = asyncio.run(scrape())
    assert 'accelgen_scheduler_requests_refused_total{app_class="chat",code="UNAVAILABLE"} 1.0' in body
    assert status == 404


def test_top_quantile_matches_prometheus_and_frame_renders() -> None:
    buckets = [(0.1, 50.0), (0.2, 100.0), (float("inf"), 100.0)]
    assert quantile(0.5, buckets) == pytest.approx(0.1)
    assert quantile(0.75, buckets) == pytest.approx(0.15)
    assert quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None
    m = SchedulerMetrics(SLOCatalog(), state=StateSource(
        lanes=lambda: [LaneView("w0", [], 100, 40, True, 0.001)], orphans=list, classes=lambda: ("chat", "code")))
    r = request("r")
    lane = m.lane("w0")
    lane.applied(BatchPlan(1), StepOutcome(tokens=[TokenEvent("r", 1, 0, 100.1)], finished=[finish(r, 100.1)]),
                 {"r": r}, 100.1)
    lane.timed(0.03, 0.002)
    text = frame(parse(render(m.registry).decode(), 1.0), None, "http://x/metrics")
    chat = next(line for line in text.splitlines() if line.startswith("chat"))
    assert "100.0%" in chat  # finished 1, met 1
    w0 = next(line for line in text.splitlines() if line.startswith("w0"))
    assert "60/100 (60.0%)" in w0 and "30.0" in w0  # KV and the mean iteration time in ms


def exported_names() -> set[str]:
    """Every sample name the three services export (with one request through each)."""
    info = WorkerInfo(model="m", executor="sim", block_size=16, num_blocks=11, max_model_len=64, profile_json="",
                      eos_token_id=2, vocab_size=100)
    sched = SchedulerMetrics(SLOCatalog(), state=StateSource(lanes=lambda: [LaneView("w", [], 10, 10, True, 0.0)],
                                                             orphans=list, classes=lambda: ("chat",),
                                                             hops=lambda: {"applied_to_durable": [0.001]}))
    r = request("r")
    lane = sched.lane("w")
    lane.applied(BatchPlan(1, preempted_request_ids=["r"]), StepOutcome(tokens=[TokenEvent("r", 1, 0, 100.1)],
                                                                        finished=[finish(r, 100.1)]), {"r": r},
                 time.time())  # finished now: in the recent-attainment window
    lane.decided(0.001)
    lane.timed(0.01, 0.001)
    sched.refused_submit("chat", "RESOURCE_EXHAUSTED")
    sched.accepted(request("c"))
    sched.cancelled_request("c")
    worker = WorkerMetrics("w", info)
    worker.done(WorkerPlan(1, "e"), ExecResult(1, {"r": 1}, 0.01))
    gw = GatewayMetrics(lambda: ("chat",))
    meter = gw.meter("chat", 0.0)
    meter.tokens(1)
    meter.finished(True)
    return {name for reg in (sched.registry, worker.registry, gw.registry) for name, _ in samples(reg)}


def test_the_grafana_dashboard_is_valid_and_uses_only_exported_metrics() -> None:
    import json
    import re
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "accelgen.json"
    dash = json.loads(path.read_text())
    assert any(v["type"] == "datasource" and v["name"] == "datasource" for v in dash["templating"]["list"])
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert exprs and all(t["datasource"]["uid"] == "${datasource}" for p in dash["panels"] for t in p.get("targets", []))
    used = {m for e in exprs for m in re.findall(r"accelgen_[a-z0-9_]+", e)}
    missing = used - exported_names()
    assert not missing, f"the dashboard queries metrics nobody exports: {sorted(missing)}"


def test_the_grafana_dashboard_is_what_its_script_builds() -> None:
    """deploy/grafana/accelgen.json is generated: edit scripts/make_grafana_dashboard.py and rerun it."""
    import importlib.util
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("accelgen_make_grafana_dashboard",
                                                  repo / "scripts" / "make_grafana_dashboard.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    committed = (repo / "deploy" / "grafana" / "accelgen.json").read_text()
    assert committed == script.render(script.build()), (
        "deploy/grafana/accelgen.json differs from what scripts/make_grafana_dashboard.py builds: "
        "edit the script, not the JSON, and run .venv/bin/python scripts/make_grafana_dashboard.py")
