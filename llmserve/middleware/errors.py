"""Every failure becomes one OpenAI-shaped JSON error; internals reach the log, never the client."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from llmserve.api.objects import json_response
from llmserve.errors import (
    APIError,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
)
from llmserve.request_state import RECORD

log = logging.getLogger("llmserve.errors")


def error_response(exc: APIError) -> web.Response:
    response = json_response(exc.body(), status=exc.status, headers=exc.headers)
    if exc.headers.get("Connection") == "close":
        response.force_close()  # the header alone does not make aiohttp close the connection
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    return await respond(request, handler)


async def respond(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The handler's response, or the OpenAI-shaped error it raised (the context middleware calls
    this directly: one layer fewer on every request)."""
    try:
        return await handler(request)
    except APIError as exc:
        _note(request, exc)
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        api_error = _from_http(request, exc)
        _note(request, api_error)
        return error_response(api_error)
    except ConnectionError:
        request[RECORD].disconnected = True  # the client went away: nobody to answer
        raise
    except Exception as exc:
        return _internal(request, exc)


def _internal(request: web.Request, exc: Exception) -> web.Response:
    log.error("unhandled error in %s %s", request.method, request.path, exc_info=exc)
    error = InternalError(
        "The server had an error while processing your request. Retry, and if it persists, "
        "report the X-Request-Id of this response."
    )
    _note(request, error)
    return error_response(error)


def _note(request: web.Request, exc: APIError) -> None:
    record = request.get(RECORD)
    if record is not None:
        record.error_code = exc.code
        record.rejected_by = getattr(exc, "limit", None)
        record.rejected_model = getattr(exc, "limit_model", None)


def _from_http(request: web.Request, exc: web.HTTPException) -> APIError:
    if exc.status == 404:
        return NotFound(f"Unknown path {request.path}.", code="not_found")
    if exc.status == 405:
        allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ()) or ()))
        return MethodNotAllowed(
            f"Method {request.method} is not allowed on {request.path}"
            + (f"; use {allowed}." if allowed else "."),
            headers={"Allow": allowed} if allowed else None,
        )
    if exc.status == 413:
        return PayloadTooLarge("The request body is larger than this server accepts.")
    status_error: type[APIError] = type(
        "HTTPError", (APIError,), {"status": exc.status, "error_type": "invalid_request_error"}
    )
    return status_error(exc.reason or "Request failed.", code=f"http_{exc.status}")
