"""HTTP routes beyond the OpenAI API: liveness, and what a client can do when its gateway died.

- ``GET /livez``: 200 while the process serves (liveness; ``/health`` is readiness: 503 while
  the scheduler is unreachable or the gateway drains).
- ``GET /v1/requests/{request_id}``: the request's state and output so far, as JSON with its
  text (through any gateway). An OpenAI response id is ``cmpl-<request_id>`` or
  ``chatcmpl-<request_id>``; either form is accepted, and every response carries the id in
  its ``x-request-id`` header.
- ``GET /v1/requests/{request_id}/events?from_token=N``: the rest of the request as server-sent
  events, from output token N on (each token once: the gRPC ``Attach`` over SSE), one
  ``{"token_ids", "text", "completion_tokens", "finish_reason"}`` object per event, then
  ``data: [DONE]``. Leaving early does not cancel the request (``cancel=true`` does).

The request keeps running after its gateway dies until the scheduler's ``owner_gone_cancel_s``
passes without another gateway watching it; re-attaching within that time keeps it alive.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, AsyncIterator

from fastapi import FastAPI, Query, Response
from fastapi.responses import JSONResponse, StreamingResponse

from gateway.convert import check_request_id
from gateway.errors import http_status_of, status_of
from gateway.generation import ActiveRequest, GenerationService
from gateway.openai_protocol import request_id_of
from gateway.scheduler_client import DONE_STATES
from gateway.tokenizer import IncrementalDetokenizer

def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


async def _events(active: ActiveRequest) -> AsyncIterator[str]:
    try:
        async with contextlib.aclosing(active.deltas()) as deltas:
            async for d in deltas:
                yield _event({"token_ids": d.token_ids, "text": d.text, "completion_tokens": d.completion_tokens,
                              "finish_reason": d.finish_reason if d.finished else None})
    except Exception as exc:  # the status line is gone: in-band, as the OpenAI stream does
        code, message = status_of(exc)
        status, err_type = http_status_of(code)
        yield _event({"error": {"message": message, "type": err_type, "code": status}})
    yield "data: [DONE]\n\n"


def add_routes(app: FastAPI, service: GenerationService) -> None:
    @app.get("/livez")
    async def livez() -> Response:
        return Response(status_code=200)

    @app.get("/v1/requests/{request_id}")
    async def request_state(request_id: str) -> JSONResponse:
        rid = check_request_id(request_id_of(request_id))
        state = await service.client.get_request(rid, include_prompt=True)
        detok = IncrementalDetokenizer(service.tokenizer, list(state.prompt_token_ids))
        text = detok.add(list(state.output_ids))
        if state.status in DONE_STATES:
            text += detok.flush()
        return JSONResponse({"id": rid, "status": state.status, "finish_reason": state.finish_reason or None,
                             "text": text, "token_ids": list(state.output_ids),
                             "prompt_tokens": state.prompt_tokens, "completion_tokens": len(state.output_ids)},
                            headers={"x-request-id": rid})

    @app.get("/v1/requests/{request_id}/events")
    async def request_events(request_id: str, from_token: int = Query(0, ge=0, le=2**31 - 1),
                             cancel: bool = False) -> Response:
        rid = request_id_of(request_id)
        active = await service.attach(rid, from_token, keep_running=not cancel)
        return StreamingResponse(_events(active), media_type="text/event-stream", headers={"x-request-id": rid})
