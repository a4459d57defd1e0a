"""OpenAI-compatible HTTP front end (FastAPI), over the same pipeline as the gRPC service.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (SSE streaming or one JSON
answer), ``GET /v1/models``, ``GET /health``. Validation and Submit happen *before* the response
starts, so a rejected request gets a real HTTP status (400/429/503) even when it asked to
stream; only failures after the first byte (the stream could not be resumed) arrive in-band,
as an error event followed by ``data: [DONE]`` as vLLM sends them.

With API keys configured, every route but ``/health``, ``/livez`` and ``/metrics`` (Prometheus,
gateway/metrics.py) needs
``Authorization: Bearer KEY``: ``ApiKeyMiddleware`` answers 401 (OpenAI's ``invalid_api_key``
error, ``WWW-Authenticate: Bearer``) before a route runs or a byte of the body is read, and
leaves the caller in ``request.state.caller`` for the routes. A websocket (no route takes one)
is closed unless authenticated: nothing but a known scope type with a valid key gets past it.
Every route behind the key counts against the key's rate (``Caller.admit`` or ``charge``).

A streamed answer is an ``SSEResponse``: it ends its request's stream however the response
ends — read to the end, left mid-way, or never iterated at all (a client gone before the first
byte: Starlette then never starts the body, so no ``finally`` in it would ever run).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any, AsyncGenerator

import grpc
import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.auth import Caller, KeyRing

from gateway.convert import too_long
from gateway.errors import GatewayError, http_status_of, invalid, printable, retry_after_ms, status_of, too_large
from gateway.choices import Choices, expand, start_choices
from gateway.generation import GenerationService, Outcome
from gateway.openai_json import parse_json
from gateway.openai_protocol import (Kind, OpenAIRequest, check_model, error_body, models_body, parse_request,
                                     response_id)
from gateway.openai_responses import StreamWriter, full_response
from gateway.tokenizer import Tokenizer

log = structlog.get_logger("gateway.http")


def _error_response(exc: BaseException, param: str | None = None) -> JSONResponse:
    code, message = status_of(exc)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return unauthorized(printable(message))
    status, err_type = http_status_of(code)
    if isinstance(exc, GatewayError):
        param = exc.param
        if exc.http_status is not None:
            status, err_type = exc.http_status, "RequestTooLargeError" if exc.http_status == 413 else err_type
    message = printable(message)
    headers = None
    retry_ms = retry_after_ms(exc)
    if retry_ms is not None:  # HTTP's Retry-After is whole seconds
        headers = {"Retry-After": str(max(1, -(-retry_ms // 1000)))}
    return JSONResponse(error_body(message, err_type, status, param), status_code=status, headers=headers)


OPEN_PATHS = frozenset({"/health", "/livez", "/metrics"})  # probes and Prometheus (as vLLM): they have no key
POLICY_VIOLATION = 1008  # the websocket close code for a refused handshake (the server answers 403)


def unauthorized(message: str) -> JSONResponse:
    """401 as OpenAI's API answers a bad key, with the challenge RFC 6750 asks for."""
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
    return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})


class ApiKeyMiddleware:
    """Authenticates every HTTP request (but the probes) and every websocket from its headers
    alone, so a caller without a key cannot make the gateway read, parse or buffer a body;
    unknown paths too (no route discovery without a key). Deny by default: a websocket without
    a valid key is closed before the app sees it, and only ``lifespan`` passes unchecked."""

    def __init__(self, app: ASGIApp, keys: KeyRing) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan" or (kind == "http" and scope["path"] in OPEN_PATHS):
            await self.app(scope, receive, send)
            return
        try:
            if kind not in ("http", "websocket"):
                raise GatewayError(grpc.StatusCode.UNAUTHENTICATED, f"{kind} connections are not served")
            caller = self.keys.authenticate(Headers(scope=scope).get("authorization"))
        except GatewayError as exc:
            if kind == "http":
                await unauthorized(exc.message)(scope, receive, send)
            elif kind == "websocket":  # closed before accept: the server refuses the handshake (403)
                await send({"type": "websocket.close", "code": POLICY_VIOLATION, "reason": exc.message[:120]})
            return
        scope.setdefault("state", {})["caller"] = caller
        await self.app(scope, receive, send)


def caller_of(request: Request, service: GenerationService) -> Caller:
    """The caller ``ApiKeyMiddleware`` authenticated (or, without it, authenticated here)."""
    caller = getattr(request.state, "caller", None)
    return caller if isinstance(caller, Caller) else service.authenticate(request.headers.get("authorization"))


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` bytes: from its
    Content-Length before reading, or while reading a chunked one, so memory stays bounded."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(f"the request body has {declared} bytes; this gateway accepts at most {limit} "
                        "(max_body_bytes)")
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_large(f"the request body exceeds {limit} bytes, the most this gateway accepts (max_body_bytes)")
        parts.append(part)
    return b"".join(parts)


_THREAD_PARSE_BYTES = 64 << 10  # parsing a 4 MiB body takes ~0.5 s: off the loop, streams keep flowing


async def _read_json(request: Request, limit: int) -> Any:
    raw = await _read_body(request, limit)
    return await asyncio.to_thread(parse_json, raw) if len(raw) > _THREAD_PARSE_BYTES else parse_json(raw)


class SSEResponse(StreamingResponse):
    """Server-sent events of one call's ``Choices`` that always end their streams (module doc):
    the events generator is closed and the requests ``close``d when the response is over,
    whether its body was read to the end, left mid-way or never started — so every request is
    cancelled (unless finished), the key's concurrency place is given back and this gateway
    stops counting them among its streams."""

    def __init__(self, events: AsyncGenerator[str, None], active: Choices, headers: dict[str, str]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self._events = events
        self._active = active

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._events.aclose()  # a started stream ends its deltas (and so the request) here
            finally:
                self._active.close()  # one never started has no finally of its own: idempotent


async def _stream(kind: Kind, parsed: OpenAIRequest, active: Choices, model: str,
                  tokenizer: Tokenizer) -> AsyncGenerator[str, None]:
    """SSE events: chat's role chunk per choice, one per token batch of a choice (finish_reason
    on its last), usage if asked, then [DONE]."""
    writer = StreamWriter(parsed.fmt, response_id(kind, active.request_id), int(time.time()), model, tokenizer,
                          [a.prompt_tokens for a in active.actives])
    try:
        for payload in writer.opening():
            yield _sse(payload)
        async with contextlib.aclosing(active.deltas()) as deltas:
            async for index, d in deltas:
                chunk = writer.chunk(index, d)
                if chunk is not None:
                    yield _sse(chunk)
        closing = writer.closing()
        if closing is not None:
            yield _sse(closing)
    except Exception as exc:  # the status line is gone; report in-band like vLLM
        code, message = status_of(exc)
        status, err_type = http_status_of(code)
        log.warning("stream_failed", request_id=active.request_id, code=code.name, message=message)
        yield _sse(error_body(printable(message), err_type, status))
    yield "data: [DONE]\n\n"


async def _collect_unless_disconnected(request: Request, active: Choices) -> list[Outcome] | None:
    """Every choice's whole output, or None if the client went away first (every request still
    running is then cancelled)."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    collect = asyncio.ensure_future(active.collect())
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({collect, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not collect.done():
            collect.cancel()  # collect's clean-up cancels the request at the scheduler
            with contextlib.suppress(asyncio.CancelledError):
                await collect
    if collect.cancelled():
        return None
    return collect.result()


def create_app(service: GenerationService) -> FastAPI:
    """The HTTP app; ``app.state.draining = True`` makes /health answer 503 during shutdown."""
    app = FastAPI(title="AccelGen gateway (OpenAI-compatible)", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.draining = False
    app.add_middleware(ApiKeyMiddleware, keys=service.keys)

    @app.exception_handler(GatewayError)
    async def _gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(grpc.aio.AioRpcError)
    async def _rpc_error(request: Request, exc: grpc.aio.AioRpcError) -> JSONResponse:
        log.warning("scheduler_call_failed", path=request.url.path, code=exc.code().name, details=exc.details())
        return _error_response(exc)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("http_request_failed")
        return _error_response(exc)

    @app.get("/health")
    async def health() -> Response:
        # Readiness: 503 while draining or while the scheduler is unreachable (gateway.main sets ready).
        return Response(status_code=503 if app.state.draining or not getattr(app.state, "ready", True) else 200)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:  # a key is needed (the middleware): it names the model
        caller_of(request, service).charge()
        info = await service.client.server_info()
        return JSONResponse(models_body(info.model, info.max_model_len, int(time.time())))

    async def generate(kind: Kind, request: Request) -> Response:
        caller = caller_of(request, service)
        config = service.config
        with caller.admit().until_failure() as lease:  # over its limits: 429 before the body is read
            body = await _read_json(request, max(1, int(config.max_body_bytes)))
            parsed = parse_request(kind, body, request.headers, max_prompt_chars=config.max_prompt_chars,
                                   max_messages=config.max_messages)
            if parsed.messages is not None:
                try:
                    parsed.generate.text = service.tokenizer.apply_chat(parsed.messages)
                except Exception as exc:  # a template that rejects the roles/order
                    raise invalid(f"messages: the model's chat template rejected them: {exc}", "messages") from None
                # The contents were held to the cap; the text the tokenizer gets also has the
                # roles and the template's own text: it is held to the same cap (a len, no cost).
                if len(parsed.generate.text) > config.max_prompt_chars:
                    raise too_long("messages", len(parsed.generate.text), config.max_prompt_chars,
                                   " (the prompt the model's chat template made of them)")
            children = []
            for one in parsed.prompts:  # each prompt of a list is a request of its own, n times
                prepared = await service.prepare(one, names=parsed.names, text_output=True, caller=caller,
                                                 chars_checked=True)
                children.extend(expand(prepared, parsed.fmt.n))
            model = (await service.client.server_info()).model  # cached: prepare has just asked
            check_model(body.get("model"), config.model_names(model))
            lease.widen(len(children) - 1)  # each prompt's each sample is a stream under the key's cap
            active = await start_choices(service, children, lease)
        headers = {"x-request-id": active.request_id}
        if parsed.stream:
            return SSEResponse(_stream(kind, parsed, active, model, service.tokenizer), active, headers)
        outcomes = await _collect_unless_disconnected(request, active)
        if outcomes is None:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        body = full_response(parsed.fmt, response_id(kind, active.request_id), int(time.time()), model, outcomes,
                             service.tokenizer)
        return JSONResponse(body, headers=headers)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate("completion", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate("chat", request)

    return app
