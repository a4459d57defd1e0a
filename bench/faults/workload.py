"""The campaign's load: a seeded mixed-SLO workload of greedy requests, and the clients that send it.

Every request is fully described by a ``RequestSpec``, so the fault-free reference run replays
exactly the same requests. Its ``request_id`` is the client's label: the gateway makes the real
id (which the sim's tokens depend on), and the client records it (``ClientRecord.request_id``,
from the ``x-request-id`` initial metadata or header) to Attach and for the end-of-run check. Most go through
the gateway's gRPC ``Generate`` (streamed), a few through its OpenAI HTTP API. A client records
what it saw: the tokens (or, over HTTP, the text), and every error by status code. When a gRPC
stream breaks after the request was accepted, the client re-attaches with the gateway's
``Attach`` RPC where the gateway has it (``from_token_index`` = tokens already received), else it
gives up and the end-of-run check (``GetRequest`` at the scheduler) decides whether the request
was still finished.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import grpc

from accelgen.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

# The scheduler's default classes (accelgen.core.slo.DEFAULT_CLASSES) and their share of the load.
CLASS_WEIGHTS = {"chat": 0.4, "code": 0.25, "summarization": 0.2, "batch": 0.15}
HTTP_SHARE = 0.08
HAS_ATTACH = "Attach" in gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].methods_by_name


@dataclass(frozen=True)
class RequestSpec:
    request_id: str
    app_class: str
    prompt: tuple[int, ...]
    max_new_tokens: int
    via: str  # "grpc" or "http"


@dataclass
class ClientRecord:
    """What one client saw of one request."""

    spec: RequestSpec
    request_id: str = ""  # the gateway's id for it ("" while the client has not learned it)
    tokens: list[int] = field(default_factory=list)  # gRPC: streamed token ids, in order
    text: str = ""  # HTTP: streamed text
    complete_ids: list[int] | None = None  # gRPC: GenerateComplete.output_ids
    finished: bool = False  # the client got its whole answer (not an abort)
    finish_reason: str = ""
    errors: list[str] = field(default_factory=list)  # status code names, in order
    attaches: int = 0
    started_at: float = 0.0
    ended_at: float = 0.0

    def to_json(self) -> dict:
        d = asdict(self)
        d["spec"] = asdict(self.spec)
        return d


def make_specs(phase: str, seed: int, vocab: tuple[int, int] = (10, 1000), prompt_len: tuple[int, int] = (8, 96),
               new_tokens: tuple[int, int] = (8, 48), http_share: float = HTTP_SHARE) -> Iterator[RequestSpec]:
    """An endless seeded stream of requests for one phase."""
    rng = random.Random(f"{phase}:{seed}")
    names, weights = list(CLASS_WEIGHTS), list(CLASS_WEIGHTS.values())
    n = 0
    while True:
        n += 1
        plen = rng.randint(*prompt_len)
        yield RequestSpec(request_id=f"{phase}-{seed}-{n:05d}", app_class=rng.choices(names, weights)[0],
                          prompt=tuple(rng.randrange(*vocab) for _ in range(plen)),
                          max_new_tokens=rng.randint(*new_tokens), via="http" if rng.random() < http_share else "grpc")


def _generate_request(spec: RequestSpec) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(
        request_id=spec.request_id, tokenized=common_pb2.TokenizedInput(input_ids=list(spec.prompt)),
        sampling_params=common_pb2.SamplingParams(temperature=0.0, max_new_tokens=spec.max_new_tokens,
                                                  ignore_eos=True),
        app_class=spec.app_class, stream=True)


class GatewayClient:
    """Sends one request and records what came back. ``gateways`` lists every gateway a client may
    use (gRPC address, HTTP port); it starts on one and re-attaches through any of them."""

    def __init__(self, gateways: list[tuple[str, int]], timeout_s: float = 120.0, attach_for_s: float = 60.0) -> None:
        self.gateways = gateways
        self.timeout_s, self.attach_for_s = timeout_s, attach_for_s
        self._channels = {addr: grpc.insecure_channel(addr) for addr, _ in gateways}

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()

    def run(self, spec: RequestSpec, gateway: int = 0) -> ClientRecord:
        rec = ClientRecord(spec, started_at=time.time())
        try:
            if spec.via == "http":
                self._http(rec, self.gateways[gateway][1])
            else:
                self._grpc(rec, gateway)
        finally:
            rec.ended_at = time.time()
        return rec

    def _consume(self, rec: ClientRecord, stream) -> None:
        for resp in stream:
            rec.request_id = resp.request_id or rec.request_id
            if resp.HasField("chunk"):
                rec.tokens.extend(resp.chunk.token_ids)
            else:
                rec.complete_ids = list(resp.complete.output_ids)
                rec.finish_reason = resp.complete.finish_reason
                rec.finished = rec.finish_reason != "abort"

    def _grpc(self, rec: ClientRecord, gateway: int) -> None:
        addr = self.gateways[gateway][0]
        call = gateway_pb2_grpc.GatewayStub(self._channels[addr]).Generate(_generate_request(rec.spec),
                                                                           timeout=self.timeout_s)
        try:
            self._consume(rec, call)
            return
        except grpc.RpcError as exc:
            rec.errors.append(exc.code().name)
            if not rec.request_id:  # broken before its first chunk: the id came first, as metadata
                rec.request_id = dict(call.initial_metadata() or ()).get("x-request-id", "")
            if not HAS_ATTACH or exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                                    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL,
                                                    grpc.StatusCode.UNKNOWN):
                return
        self._attach(rec, gateway)

    def _attach(self, rec: ClientRecord, gateway: int) -> None:
        """Re-attach from the first token not yet received, through any gateway, until it works."""
        deadline = time.monotonic() + self.attach_for_s
        n = 0
        if not rec.request_id:  # the gateway never said which id it made: nothing to attach to
            rec.errors.append("attach:no-id")
            return
        while time.monotonic() < deadline and not rec.finished and not rec.finish_reason:
            addr = self.gateways[(gateway + 1 + n) % len(self.gateways)][0]
            n += 1
            rec.attaches += 1
            req = gateway_pb2.AttachRequest(request_id=rec.request_id, from_token_index=len(rec.tokens))
            try:
                self._consume(rec, gateway_pb2_grpc.GatewayStub(self._channels[addr]).Attach(req, timeout=self.timeout_s))
                return
            except grpc.RpcError as exc:
                rec.errors.append(f"attach:{exc.code().name}")
                if exc.code() == grpc.StatusCode.NOT_FOUND:  # never accepted
                    return
            time.sleep(0.5)

    def _http(self, rec: ClientRecord, port: int) -> None:
        body = json.dumps({"prompt": list(rec.spec.prompt), "max_tokens": rec.spec.max_new_tokens,
                           "temperature": 0, "ignore_eos": True, "stream": True, "app_class": rec.spec.app_class})
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=self.timeout_s)
        try:
            conn.request("POST", "/v1/completions", body, {"content-type": "application/json",
                                                           "x-request-id": rec.spec.request_id})
            resp = conn.getresponse()
            rec.request_id = resp.getheader("x-request-id", "") or ""
            if resp.status != 200:
                rec.errors.append(f"http:{resp.status}")
                resp.read()
                return
            for raw in resp:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    rec.errors.append(f"http-stream:{event['error'].get('code', '?')}")
                    return
                choice = event["choices"][0]
                rec.text += choice.get("text", "")
                if choice.get("finish_reason"):
                    rec.finish_reason = choice["finish_reason"]
                    rec.finished = rec.finish_reason != "abort"
        except (OSError, http.client.HTTPException, ValueError) as exc:
            rec.errors.append(f"http:{type(exc).__name__}")
        finally:
            conn.close()


class LoadRunner:
    """``concurrency`` client threads sending requests from ``specs`` until ``stop()``; then every
    thread finishes the request it holds. Records land in ``records`` in completion order."""

    def __init__(self, client: GatewayClient, specs: Iterator[RequestSpec], concurrency: int,
                 think_s: tuple[float, float] = (0.0, 0.2), seed: int = 0) -> None:
        self.client, self.specs, self.concurrency = client, specs, concurrency
        self.think_s = think_s
        self.records: list[ClientRecord] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._rng = random.Random(seed)
        self._threads = [threading.Thread(target=self._loop, args=(i,), name=f"client-{i}", daemon=True)
                         for i in range(concurrency)]

    def start(self) -> "LoadRunner":
        for t in self._threads:
            t.start()
        return self

    def _next(self) -> RequestSpec | None:
        with self._lock:
            return None if self._stopping.is_set() else next(self.specs)

    def _loop(self, i: int) -> None:
        """A client that failed backs off (0.25 s doubling to 4 s) and tries the next gateway, as
        a client behind a load balancer would; one that succeeded thinks for ``think_s``."""
        gateway, backoff = i % len(self.client.gateways), 0.0
        while (spec := self._next()) is not None:
            rec = self.client.run(spec, gateway=gateway)
            with self._lock:
                self.records.append(rec)
                pause = self._rng.uniform(*self.think_s)
            if rec.errors and not rec.finished:
                backoff = min(4.0, max(0.25, 2 * backoff))
                gateway = (gateway + 1) % len(self.client.gateways)
                pause += backoff
            else:
                backoff = 0.0
            self._stopping.wait(pause)

    def stop(self, timeout_s: float = 300.0) -> None:
        self._stopping.set()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(timeout=max(0.1, deadline - time.monotonic()))


def run_all(client: GatewayClient, specs: list[RequestSpec], concurrency: int) -> dict[str, ClientRecord]:
    """Send every spec once (the reference run), ``concurrency`` at a time."""
    it = iter(specs)
    runner = LoadRunner(client, it, concurrency, think_s=(0.0, 0.0))
    runner._next = lambda: _next_or_none(runner, it)  # type: ignore[method-assign]
    runner.start()
    for t in runner._threads:
        t.join()
    return {r.spec.request_id: r for r in runner.records}


def _next_or_none(runner: LoadRunner, it: Iterator[RequestSpec]) -> RequestSpec | None:
    with runner._lock:
        return next(it, None)
