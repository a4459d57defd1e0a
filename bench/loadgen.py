"""Replay a workload against a running gateway and measure it like the simulator does.

Each workload request is sent at its arrival time through the gateway's gRPC ``Generate``
(streaming), with its true output length as ``max_new_tokens`` and ``ignore_eos`` so the
service produces exactly the tokens the simulator would. Token times are taken when tokens
arrive here; the metrics module is the simulator's, so the two reports line up column by column.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import grpc

from accelgen.common.grpc_server import CHANNEL_OPTIONS
from accelgen.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from bench.workloads import WorkloadRequest
from accelgen.core.metrics import MetricsCollector, RequestRecord
from accelgen.core.slo import SLOCatalog

PROMPT_TOKEN = 7


@dataclass
class LoadResult:
    summary: dict[str, Any]  # token times as this client saw them
    server_summary: dict[str, Any]  # token times as the scheduler emitted them (no gateway/client transport)
    errors: dict[str, int]
    wall_s: float
    # Each token from the moment the scheduler applied its iteration (emitted_at) to its arrival
    # here: Redis, WatchMany, the gateway and this client's stream (one machine, one clock).
    client_lag_ms: dict[str, float] = field(default_factory=dict)
    # Every request as this client saw it (token times on the client clock): the per-class report.
    records: list[RequestRecord] = field(default_factory=list)


async def _one(stub: gateway_pb2_grpc.GatewayStub, item: WorkloadRequest, t0: float, metrics: MetricsCollector,
               server: MetricsCollector, epoch0: float, errors: dict[str, int], timeout_s: float,
               lags: list[float]) -> None:
    delay = t0 + item.arrival_s - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    req = gateway_pb2.GenerateRequest(
        request_id=f"load-{item.request_id}-{int(t0 * 1000) % 100000}",
        tokenized=common_pb2.TokenizedInput(input_ids=[PROMPT_TOKEN] * item.prompt_len),
        sampling_params=common_pb2.SamplingParams(max_new_tokens=item.output_len, ignore_eos=True),
        app_class=item.app_class, stream=True)
    sent = time.monotonic() - t0
    metrics.requests[item.request_id].arrival_s = sent
    server.requests[item.request_id].arrival_s = sent
    try:
        async for resp in stub.Generate(req, timeout=timeout_s):
            now, wall = time.monotonic() - t0, time.time()
            if resp.HasField("chunk"):
                for i, _ in enumerate(resp.chunk.token_ids):
                    metrics.on_token(item.request_id, now)
                    if i < len(resp.chunk.timings):
                        server.on_token(item.request_id, resp.chunk.timings[i].emitted_at - epoch0)
                        lags.append(wall - resp.chunk.timings[i].emitted_at)
            elif resp.HasField("complete"):
                metrics.on_finish(item.request_id, now, resp.complete.finish_reason)
                times = server.requests[item.request_id].token_times
                server.on_finish(item.request_id, times[-1] if times else now, resp.complete.finish_reason)
    except grpc.aio.AioRpcError as exc:
        errors[exc.code().name] = errors.get(exc.code().name, 0) + 1


async def replay(address: str, workload: Sequence[WorkloadRequest], catalog: SLOCatalog, s_pf: int,
                 timeout_s: float = 3600.0) -> LoadResult:
    metrics, server = MetricsCollector(s_pf), MetricsCollector(s_pf)
    for item in workload:
        for m in (metrics, server):
            m.on_arrival(item.request_id, item.app_class, catalog.get(item.app_class).slo, item.arrival_s,
                         item.prompt_len)
    errors: dict[str, int] = {}
    lags: list[float] = []
    started = time.monotonic()
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        t0 = time.monotonic() + 0.2
        epoch0 = time.time() + 0.2  # the same instant on the scheduler's (epoch) clock, this machine
        await asyncio.gather(*(_one(stub, item, t0, metrics, server, epoch0, errors, timeout_s, lags)
                               for item in workload))
    lag_ms = sorted(1000.0 * x for x in lags)
    client_lag = ({"p50_ms": lag_ms[len(lag_ms) // 2], "p99_ms": lag_ms[min(len(lag_ms) - 1, int(0.99 * len(lag_ms)))],
                   "samples": len(lag_ms)} if lag_ms else {})
    return LoadResult(summary=metrics.summary(), server_summary=server.summary(), errors=errors,
                      wall_s=time.monotonic() - started, client_lag_ms=client_lag,
                      records=list(metrics.requests.values()))


def run_load(address: str, workload: Sequence[WorkloadRequest], catalog: SLOCatalog, s_pf: int) -> LoadResult:
    return asyncio.run(replay(address, workload, catalog, s_pf))
