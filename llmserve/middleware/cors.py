"""CORS for browser clients (`server.cors`): a preflight from an allowed origin is answered at
once, before authentication (browsers send preflights without credentials); every response to
an allowed origin, errors and streams included, names it in `Access-Control-Allow-Origin`.
Requests from other origins get no CORS headers, so the browser keeps their answers from the
page. The settings are read per request (`settings(request)`), so a config reload changes
them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from llmserve.config import CorsConfig
from llmserve.errors import PermissionDenied

_PREFLIGHT_METHOD = "Access-Control-Request-Method"


Settings = Callable[[web.Request], CorsConfig]


def cors_middleware(settings: Settings) -> Middleware:
    @web.middleware
    async def answer_preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method != "OPTIONS" or _PREFLIGHT_METHOD not in request.headers:
            return await handler(request)
        cors = settings(request)
        if not cors.allowed_origins:
            return await handler(request)
        origin = request.headers.get("Origin", "")
        if not cors.allows(origin):
            raise PermissionDenied(
                "This origin may not call this server (server.cors.allowed_origins).",
                code="origin_not_allowed",
            )
        return web.Response(status=204, headers=_preflight_headers(cors, request, origin))

    return answer_preflight


def _preflight_headers(cors: CorsConfig, request: web.Request, origin: str) -> dict[str, str]:
    asked = request.headers.get("Access-Control-Request-Headers", "")
    headers = asked if "*" in cors.allowed_headers else ", ".join(cors.allowed_headers)
    out = {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": ", ".join(cors.allowed_methods),
        "Access-Control-Max-Age": str(cors.max_age_seconds),
        "Vary": "Origin",
    }
    if headers:
        out["Access-Control-Allow-Headers"] = headers
    return out


def cors_response_hook(
    settings: Settings,
) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if not origin:
            return
        cors = settings(request)
        if cors.allowed_origins and cors.allows(origin):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = ", ".join(cors.expose_headers)
            response.headers.add("Vary", "Origin")

    return add_cors_headers
