"""Build the aiohttp application from its collaborators (all injected, so tests pick fakes)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from llmserve.admission.protocol import Admission
from llmserve.api import admin, generation, info
from llmserve.api.gateway import Gateway
from llmserve.app_state import CONFIG, GATEWAY, LEDGER, LIFECYCLE, METRICS
from llmserve.auth.principal import ANONYMOUS, Principal
from llmserve.config import Config, CorsConfig
from llmserve.engine.base import Engine
from llmserve.lifecycle import Lifecycle
from llmserve.limits.protocol import RateLimiter
from llmserve.metrics import Metrics
from llmserve.middleware.context import add_request_id, context_middleware
from llmserve.middleware.cors import cors_middleware, cors_response_hook
from llmserve.request_state import PRINCIPAL
from llmserve.usage import UsageLedger

log = logging.getLogger("llmserve.server")
ADMIN = Principal(id="admin-port", kind="anonymous", admin=True)

ENGINE_START = web.AppKey("engine_start", asyncio.Task)
MAX_HEADER_BYTES = 128 * 1024
LINGER_SECONDS = 2.0


def build_app(
    config: Config,
    engine: Engine,
    *,
    limiter: RateLimiter | None = None,
    admission: Admission | None = None,
    metrics: Metrics | None = None,
    ledger: UsageLedger | None = None,
    auth_middleware: Middleware | None = None,
) -> web.Application:
    """The API application. The engine starts in the background when the app starts, so /health
    answers at once and /ready turns 200 when the model is loaded."""
    middlewares: list[Middleware] = [context_middleware]  # it turns errors into responses too
    middlewares.append(cors_middleware(_live_cors))  # preflights carry no key
    middlewares.append(auth_middleware or anonymous_principal)
    app = web.Application(
        middlewares=middlewares,
        client_max_size=int(config.server.max_body_bytes),
        # aiohttp answers a header over its default 8 KiB itself, quoting its first bytes (which
        # may hold a key); a larger cap lets such a request reach auth and get a clean 401.
        # After an answer to a body it did not read whole (413, 408), aiohttp keeps reading
        # ("lingering") so the client sees the answer, not a reset: 10 s by default, which
        # would let a stalled client hold its connection far past body_read_timeout_seconds.
        handler_args={"max_field_size": MAX_HEADER_BYTES, "lingering_time": LINGER_SECONDS},
    )
    app[CONFIG] = config
    app[GATEWAY] = Gateway(config, engine, limiter=limiter, admission=admission)
    app[LIFECYCLE] = Lifecycle()
    app[METRICS] = metrics
    app[LEDGER] = ledger
    app.on_response_prepare.append(add_request_id)
    app.on_response_prepare.append(cors_response_hook(_live_cors))
    app.cleanup_ctx.append(_engine_context)
    add_routes(app)
    return app


def build_admin_app(main: web.Application) -> web.Application:
    """/metrics, /ready and /health without credentials, for a listener bound to localhost."""
    app = web.Application(middlewares=[context_middleware, admin_principal])
    app[CONFIG] = main[CONFIG]
    app[GATEWAY] = main[GATEWAY]
    app[LIFECYCLE] = main[LIFECYCLE]
    app[METRICS] = main[METRICS]
    app[LEDGER] = main[LEDGER]
    app.on_response_prepare.append(add_request_id)
    app.router.add_get("/health", info.health)
    app.router.add_get("/ready", info.ready)
    app.router.add_get("/metrics", info.metrics)
    add_admin_routes(app)
    return app


def _live_cors(request: web.Request) -> CorsConfig:
    """The CORS settings now (a reload may change them)."""
    return request.app[GATEWAY].config.server.cors


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", generation.chat_completions)
    app.router.add_post("/v1/completions", generation.completions)
    app.router.add_post("/v1/responses", generation.responses)
    app.router.add_post("/tokenize", generation.tokenize)
    app.router.add_post("/detokenize", generation.detokenize)
    app.router.add_get("/v1/models", info.list_models)
    app.router.add_get("/v1/models/{model:.+}", info.get_model)  # names may hold "/"
    app.router.add_get("/health", info.health)
    app.router.add_get("/ready", info.ready)
    app.router.add_get("/metrics", info.metrics)
    add_admin_routes(app)


def add_admin_routes(app: web.Application) -> None:
    """The operator's routes (middleware/auth.py ADMIN_PATHS: an admin on the public port)."""
    app.router.add_post("/admin/reload", admin.reload)
    app.router.add_post("/admin/models/load", admin.load_model)
    app.router.add_post("/admin/models/unload", admin.unload_model)
    app.router.add_post("/v1/load_lora_adapter", admin.load_lora_adapter)
    app.router.add_post("/v1/unload_lora_adapter", admin.unload_lora_adapter)


@web.middleware
async def anonymous_principal(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With auth disabled every caller is the same anonymous principal."""
    request[PRINCIPAL] = ANONYMOUS
    return await handler(request)


@web.middleware
async def admin_principal(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The admin listener is bound to localhost: whoever reaches it is the operator."""
    request[PRINCIPAL] = ADMIN
    return await handler(request)


async def _engine_context(app: web.Application) -> AsyncIterator[None]:
    gateway = app[GATEWAY]
    app[ENGINE_START] = asyncio.create_task(_start_engine(gateway), name="engine-start")
    yield
    await gateway.heartbeats.close()
    start = app[ENGINE_START]
    if not start.done():
        start.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await start
    await gateway.engine.close()


async def _start_engine(gateway: Gateway) -> None:
    await gateway.engine.start()
    if gateway.admission is not None:
        gateway.admission.engine_started(
            gateway.config, whole_prompt_steps=gateway.engine.whole_prompt_steps
        )
    gateway.ready = True
    log.info("engine ready: serving model %r", gateway.engine.model_name)
