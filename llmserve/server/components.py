"""Compose the server from the config: engine, auth, limiter, admission queue, metrics, ledger."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from llmserve.admission import AdmissionQueue
from llmserve.app_state import AUTHENTICATOR, GATEWAY
from llmserve.auth.authenticator import Authenticator
from llmserve.auth.redact import install_redaction
from llmserve.auth.store import KeyStoreBackend, key_store_from_url
from llmserve.config import Config
from llmserve.engine.base import Engine
from llmserve.engine.factory import create_engine
from llmserve.limits import Limiter, store_from_url
from llmserve.limits.stores.persistence import ChecksPersistence
from llmserve.metrics import Metrics
from llmserve.middleware.auth import auth_middleware
from llmserve.server.app import build_admin_app, build_app
from llmserve.server.heap import PauseRecorder
from llmserve.usage import open_ledger

CleanupContext = Callable[[web.Application], AsyncIterator[None]]

log = logging.getLogger("llmserve.server")


@dataclass(frozen=True, slots=True)
class Components:
    """The API app and, when configured, the admin app. Everything they own is closed by the
    API app's cleanup (aiohttp's cleanup_ctx): after the engine, in reverse order of creation."""

    app: web.Application
    admin_app: web.Application | None = None


def _closing(closers: list[Callable[[], Any]]) -> CleanupContext:
    async def close_all(app: web.Application) -> AsyncIterator[None]:
        yield
        for closer in reversed(closers):  # one failing closer does not stop the others
            try:
                result = closer()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("error while closing %r", closer)

    return close_all


def _starting(authenticator: Authenticator) -> CleanupContext:
    """Once the server runs: the authenticator's background work (the JWKS refresher, whose
    first fetch never blocks the start). `authenticator.close`, a closer, stops it."""

    async def start(app: web.Application) -> AsyncIterator[None]:
        await authenticator.start()
        yield

    return start


def _warn_without_persistence(*stores: object) -> CleanupContext:
    """Once the server runs: warn when a Redis store (the limiter's, the key store) keeps no
    copy of its data. Checked in the background: a slow Redis delays nothing."""

    async def check(app: web.Application) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(_log_warning(store.persistence_warning))
                 for store in stores if isinstance(store, ChecksPersistence)]  # fmt: skip
        yield
        for task in tasks:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    return check


async def _log_warning(probe: Callable[[], Awaitable[str | None]]) -> None:
    warning = await probe()
    if warning:
        log.warning("%s", warning)


def build_components(config: Config, *, registry: CollectorRegistry | None = None) -> Components:
    install_redaction()
    closers: list[Callable[[], Any]] = []
    middleware, authenticator, key_store = _auth(config, closers)
    limiter = Limiter(config.limits, store_from_url(config.limits.store, config.limits.state_dir))
    closers.append(limiter.close)
    ledger = open_ledger(config.usage)
    if ledger is not None:
        closers.append(ledger.close)
    metrics = Metrics(registry or CollectorRegistry(), config.metrics, limiter_stats=limiter.stats,
                      jwks_stats=authenticator.jwks_stats)  # fmt: skip
    pauses = PauseRecorder(metrics.observe_gc_pause)
    pauses.install()
    closers.append(pauses.remove)
    engine = create_engine(config.engine)
    admission = AdmissionQueue.from_config(config, observer=metrics.admission_observer())
    app = build_app(config, engine, limiter=limiter, admission=admission, metrics=metrics,
                    ledger=ledger, auth_middleware=middleware)  # fmt: skip
    app[AUTHENTICATOR] = authenticator  # server/reload.py hands it new auth settings
    _bind_metrics(metrics, app, engine, admission, config)
    admin = build_admin_app(app) if config.server.admin_port is not None else None
    app.cleanup_ctx.insert(0, _closing(closers))  # first in: cleaned up last, after the engine
    app.cleanup_ctx.insert(1, _starting(authenticator))  # its JWKS fetch begins with the engine's
    app.cleanup_ctx.append(_warn_without_persistence(limiter.store, key_store))
    return Components(app=app, admin_app=admin)


def _auth(
    config: Config, closers: list[Callable[[], Any]]
) -> tuple[Any, Authenticator, KeyStoreBackend | None]:
    store = key_store_from_url(config.auth.keys) if config.auth.enabled else None
    authenticator = Authenticator(config.auth, store, known_tiers=config.limits.tiers)
    if store is not None:
        closers.append(store.close)
    closers.append(authenticator.close)
    return auth_middleware(authenticator, config.server), authenticator, store


def _bind_metrics(metrics: Metrics, app: web.Application, engine: Engine,
                  admission: AdmissionQueue, config: Config) -> None:  # fmt: skip
    gateway = app[GATEWAY]
    metrics.bind(
        queue_depth=lambda: admission.depth,
        in_flight=lambda: admission.in_flight,
        concurrency_limit=lambda: admission.max_concurrency,
        queue_limit=lambda: admission.max_depth,
        engine_stats=engine.stats,
        engine_healthy=lambda: gateway.ready and engine.dead is None,
        model=engine.model_name,
    )
