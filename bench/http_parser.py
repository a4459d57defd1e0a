"""What the gateway's HTTP parser costs: h11 (bounded request head, what the gateway runs) against
httptools (uvicorn's default when installed, which bounds no header block).

The gateway serves OpenAI HTTP in front of a scripted in-process scheduler (``FakeScheduler``:
no model, no queue), so the time measured is the gateway's own per request. One client, one
request at a time (the latency a request pays), then ``--concurrency`` clients at once (the
requests/s one gateway process sustains): a non-streaming completion and an SSE stream of
``--tokens`` tokens each (sent by the fake at once).

    python -m bench.http_parser --requests 300 --json bench/out/http_parser.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

PARSERS = ("h11", "httptools")


def _with_parser(parser: str) -> Any:
    """Start uvicorn with ``parser``: the gateway's Config call, with only ``http`` changed."""
    import uvicorn

    original = uvicorn.Config.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["http"] = parser
        if parser != "h11":
            kwargs.pop("h11_max_incomplete_event_size", None)
        original(self, *args, **kwargs)

    return original, init


async def _measure(base: str, requests: int, concurrency: int, tokens: int) -> dict[str, Any]:
    body = {"prompt": "hello", "max_tokens": tokens, "app_class": "chat"}
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        async def one(stream: bool) -> float:
            started = time.perf_counter()
            if stream:
                async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
                    async for _ in resp.aiter_lines():
                        pass
                    assert resp.status_code == 200
            else:
                resp = await client.post("/v1/completions", json=body)
                assert resp.status_code == 200, resp.text
            return time.perf_counter() - started

        out: dict[str, Any] = {}
        for stream in (False, True):
            kind = "stream" if stream else "plain"
            for _ in range(20):  # warm-up
                await one(stream)
            serial = [await one(stream) for _ in range(requests)]
            started = time.perf_counter()
            queue = list(range(requests))

            async def worker() -> None:
                while queue:
                    queue.pop()
                    await one(stream)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
            out[kind] = {"serial_p50_ms": statistics.median(serial) * 1000,
                         "serial_p99_ms": sorted(serial)[int(0.99 * (len(serial) - 1))] * 1000,
                         "concurrent_requests_per_s": requests / elapsed}
    return out


def run(parser: str, requests: int, concurrency: int, tokens: int) -> dict[str, Any]:
    import uvicorn

    from tests.support.gateway_stack import GatewayStack

    original, patched = _with_parser(parser)
    uvicorn.Config.__init__ = patched  # type: ignore[method-assign]
    try:
        stack = GatewayStack(log_level="WARNING")
    finally:
        uvicorn.Config.__init__ = original  # type: ignore[method-assign]
    try:
        stack.reset(token_delay_s=0.0, output_ids=[3 + i % 200 for i in range(tokens)])
        return asyncio.run(_measure(stack.http_base, requests, concurrency, tokens))
    finally:
        stack.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results = {parser: run(parser, args.requests, args.concurrency, args.tokens) for parser in PARSERS}
    print(f"{'parser':<10} {'kind':<7} {'serial p50 ms':>14} {'serial p99 ms':>14} {'req/s at ' + str(args.concurrency):>12}")
    for parser, kinds in results.items():
        for kind, r in kinds.items():
            print(f"{parser:<10} {kind:<7} {r['serial_p50_ms']:>14.2f} {r['serial_p99_ms']:>14.2f} "
                  f"{r['concurrent_requests_per_s']:>12.0f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
