"""GET /v1/models, /v1/models/{id}, /health, /ready, /metrics."""

from __future__ import annotations

import time

from aiohttp import web

from llmserve.api import objects
from llmserve.api.models import catalog_of, visible_models
from llmserve.app_state import GATEWAY, LIFECYCLE, METRICS
from llmserve.engine.base import EngineUnavailable
from llmserve.errors import NotFound, ServiceUnavailable, retry_after_header, shutting_down
from llmserve.request_state import PRINCIPAL


async def list_models(request: web.Request) -> web.Response:
    """The base model, its LoRA adapters and the aliases of both that the caller may use."""
    visible = visible_models(request.app[GATEWAY], request[PRINCIPAL])
    return objects.json_response(objects.model_list(visible, _created(request)))


async def get_model(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    model = request.match_info["model"]
    served = catalog_of(gateway).get(model)
    if served is None or not served.allowed_by(request[PRINCIPAL].models):
        raise NotFound(
            f"The model '{model}' does not exist or you do not have access to it.",
            code="model_not_found", param="model",
        )  # fmt: skip
    return objects.json_response(objects.model_object(served, _created(request)))


async def health(request: web.Request) -> web.Response:
    """Liveness: the process answers. Public, cheap, never touches the engine."""
    return objects.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Readiness: the engine is loaded and healthy, and the server is not draining."""
    gateway = request.app[GATEWAY]
    if request.app[LIFECYCLE].draining:
        raise shutting_down()
    try:
        await gateway.engine.check_health()
    except EngineUnavailable as exc:
        raise ServiceUnavailable(
            f"The model engine is not ready: {exc}.", code="engine_unavailable",
            headers=retry_after_header(5),
        ) from None  # fmt: skip
    return objects.json_response({"status": "ready", "model": gateway.engine.model_name})


async def metrics(request: web.Request) -> web.Response:
    registry = request.app.get(METRICS)
    if registry is None:
        raise NotFound("Metrics are not enabled on this server.", code="not_found")
    body, content_type = registry.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


def _created(request: web.Request) -> int:
    return int(request.app[LIFECYCLE].started_at or time.time())
