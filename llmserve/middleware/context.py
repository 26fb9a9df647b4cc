"""The outermost layer: request id, timing, in-flight tracking, errors (middleware/errors.py),
access log, metrics, ledger."""

from __future__ import annotations

import asyncio
import logging
import re
import time

from aiohttp import web
from aiohttp.typedefs import Handler

from llmserve.api.objects import new_id
from llmserve.app_state import LEDGER, LIFECYCLE, METRICS
from llmserve.errors import shutting_down
from llmserve.logs import request_id_var
from llmserve.middleware.errors import error_response, respond
from llmserve.records import GENERATION_ROUTES, RequestRecord
from llmserve.request_state import PRINCIPAL, RECORD, STARTED

access_log = logging.getLogger("llmserve.access")
log = logging.getLogger("llmserve.server")

_SAFE_ID = re.compile(r"[^A-Za-z0-9._:\-]")
ROUTES = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/responses": "responses",
    "/tokenize": "tokenize",
    "/detokenize": "detokenize",
    "/v1/models": "models",
    "/health": "health",
    "/ready": "ready",
    "/metrics": "metrics",
}


def request_id_from(request: web.Request) -> str:
    """The client's X-Request-Id if it is sane (printable, <= 128 chars), else a new one."""
    given = _SAFE_ID.sub("", request.headers.get("X-Request-Id", ""))[:128]
    return given or new_id("req_")


def route_of(path: str) -> str:
    if path.startswith("/v1/models/"):
        return "models"
    return ROUTES.get(path, "other")


@web.middleware
async def context_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = request_id_from(request)
    request_id_var.set(request_id)
    record = RequestRecord(request_id=request_id, route=route_of(request.path),
                           started_at=time.time())  # fmt: skip
    request[RECORD] = record
    request[STARTED] = asyncio.get_running_loop().time()
    lifecycle = request.app[LIFECYCLE]
    task = asyncio.current_task()
    assert task is not None
    lifecycle.enter(task)
    response: web.StreamResponse | None = None
    try:
        response = await _handle(request, handler, lifecycle.draining)
        return response
    except (asyncio.CancelledError, ConnectionError):
        # what the client received decides: a stream that delivered its last event is a
        # success even when the client closes while settlement is still on its way
        record.disconnected = not record.delivered
        raise
    finally:
        lifecycle.leave(task)
        _finish(request, record, response)


async def _handle(request: web.Request, handler: Handler, draining: bool) -> web.StreamResponse:
    if draining and request.path != "/health":
        error = shutting_down()
        error.headers["Connection"] = "close"
        request[RECORD].error_code = error.code
        response: web.StreamResponse = error_response(error)
    else:
        response = await respond(request, handler)
    return response


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare hook: every response, streamed or not, names its request."""
    record = request.get(RECORD)
    if record is not None:
        response.headers["X-Request-Id"] = record.request_id


def _finish(request: web.Request, record: RequestRecord,
            response: web.StreamResponse | None) -> None:  # fmt: skip
    record.total_seconds = asyncio.get_running_loop().time() - request[STARTED]
    if record.principal_id is None and (principal := request.get(PRINCIPAL)) is not None:
        record.principal_id = principal.id
    if record.disconnected:
        record.status = 499
    elif response is not None:
        record.status = response.status
    else:
        record.status = 200 if record.delivered else 499
    metrics = request.app.get(METRICS)
    if metrics is not None:
        metrics.observe(record)
    ledger = request.app.get(LEDGER)
    # usage is what passed the rate limiter: a flood of refusals (bad keys, 429s, bad bodies)
    # must not rotate real usage out of the ledger; metrics and the access log count those
    if ledger is not None and record.admitted and record.route in GENERATION_ROUTES:
        try:
            ledger.append(record)
        except OSError:
            log.exception("could not append to the usage ledger")
    if access_log.isEnabledFor(logging.INFO):
        access_log.info(
            "%s %s %d %.1fms prompt=%d completion=%d principal=%s%s",
            request.method, request.path, record.status, record.total_seconds * 1000,
            record.prompt_tokens, record.completion_tokens, record.principal_id or "-",
            f" error={record.error_code}" if record.error_code else "",
        )  # fmt: skip
