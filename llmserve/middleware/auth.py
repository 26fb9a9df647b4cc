"""The auth middleware: every route needs a principal, except /health (and /metrics, /ready
when the config makes them public). Failures are raised as APIError for the error middleware."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from llmserve.app_state import GATEWAY
from llmserve.auth.authenticator import Authenticator
from llmserve.auth.permissions import ensure_admin
from llmserve.auth.principal import ANONYMOUS, Principal
from llmserve.config import ServerConfig
from llmserve.request_state import PRINCIPAL

ADMIN_PATHS = frozenset({
    "/metrics", "/ready", "/admin/reload", "/admin/models/load", "/admin/models/unload",
    "/v1/load_lora_adapter", "/v1/unload_lora_adapter",
})  # fmt: skip


def public_paths(server: ServerConfig) -> frozenset[str]:
    paths = {"/health"}
    if server.public_metrics:
        paths.add("/metrics")
    if server.public_ready:
        paths.add("/ready")
    return frozenset(paths)


def _route_path(request: web.Request) -> str:
    # The matched route's path, not the raw one: whatever spelling reaches /metrics is checked
    # as /metrics.
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else request.path


def request_principal(request: web.Request) -> Principal:
    return request[PRINCIPAL]


def auth_middleware(authenticator: Authenticator, server: ServerConfig) -> Middleware:
    """Sets request[PRINCIPAL]; raises AuthenticationFailed (401) / PermissionDenied (403).
    Which paths are public follows the live config (`server.public_*`, reloadable)."""
    live: list[tuple[ServerConfig, frozenset[str]]] = [(server, public_paths(server))]

    def open_paths(request: web.Request) -> frozenset[str]:
        gateway = request.app.get(GATEWAY)  # absent only in a bare app (tests of this module)
        now = gateway.config.server if gateway is not None else live[0][0]
        if live[0][0] is not now:
            live[0] = (now, public_paths(now))
        return live[0][1]

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = _route_path(request)
        if path in open_paths(request):
            request[PRINCIPAL] = ANONYMOUS
            return await handler(request)
        principal = await authenticator.authenticate(request.headers)
        if path in ADMIN_PATHS:
            ensure_admin(principal)
        request[PRINCIPAL] = principal
        return await handler(request)

    return auth
