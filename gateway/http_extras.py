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

Both need the key that made the request (another key's request is 404, as an unknown id is)
and count against the key's rate (429 with ``Retry-After``): the state read costs a scheduler
call and detokenises the prompt; ``/events`` also takes a place under its concurrency cap.

The request keeps running after its gateway dies until the scheduler's ``owner_gone_cancel_s``
passes without another gateway watching it; re-attaching within that time keeps it alive.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, AsyncGenerator

from fastapi import FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse

from gateway.errors import http_status_of, status_of
from gateway.generation import ActiveRequest, GenerationService
from gateway.openai_http import SSEResponse, caller_of
from gateway.openai_protocol import request_id_of
from gateway.stop_strings import OutputText
from gateway.tokenizer import IncrementalDetokenizer

def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


async def _events(active: ActiveRequest) -> AsyncGenerator[str, None]:
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
    async def request_state(request_id: str, request: Request) -> JSONResponse:
        rid = request_id_of(request_id)
        caller = caller_of(request, service)
        caller.charge()
        state = await service.owned_state(caller, rid, include_prompt=True)
        # The text as the stream made it: the request's stored stop strings cut it the same way.
        output = OutputText(IncrementalDetokenizer(service.tokenizer, list(state.prompt_token_ids)),
                            list(state.stop), state.include_stop_str_in_output)
        output.update(list(state.output_ids), stop_terminated=False)
        text = output.text
        return JSONResponse({"id": rid, "status": state.status, "finish_reason": state.finish_reason or None,
                             "label": state.label or None, "text": text, "token_ids": list(state.output_ids),
                             "prompt_tokens": state.prompt_tokens, "completion_tokens": len(state.output_ids)},
                            headers={"x-request-id": rid})

    @app.get("/v1/requests/{request_id}/events")
    async def request_events(request_id: str, request: Request, from_token: int = Query(0, ge=0, le=2**31 - 1),
                             cancel: bool = False) -> Response:
        rid = request_id_of(request_id)
        caller = caller_of(request, service)
        active = await service.attach(rid, from_token, keep_running=not cancel, caller=caller, lease=caller.admit())
        return SSEResponse(_events(active), active, {"x-request-id": rid})
