"""The auth middleware: every route needs a principal, except /health (and /metrics, /ready
when the config makes them public). Failures are raised as APIError for the error middleware."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from llmserve.auth.authenticator import Authenticator
from llmserve.auth.permissions import ensure_admin
from llmserve.auth.principal import ANONYMOUS, Principal
from llmserve.config import ServerConfig
from llmserve.request_state import PRINCIPAL

ADMIN_PATHS = frozenset({"/metrics", "/ready"})


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
    """Sets request[PRINCIPAL]; raises AuthenticationFailed (401) / PermissionDenied (403)."""
    open_paths = public_paths(server)

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = _route_path(request)
        if path in open_paths:
            request[PRINCIPAL] = ANONYMOUS
            return await handler(request)
        principal = await authenticator.authenticate(request.headers)
        if path in ADMIN_PATHS:
            ensure_admin(principal)
        request[PRINCIPAL] = principal
        return await handler(request)

    return auth
