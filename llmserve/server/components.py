"""Compose the server from the config: engine, auth, limiter, admission queue, metrics, ledger."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from llmserve.admission import AdmissionQueue
from llmserve.app_state import GATEWAY, LIFECYCLE
from llmserve.auth.authenticator import Authenticator
from llmserve.auth.keys import KeyStore
from llmserve.auth.redact import install_redaction
from llmserve.config import Config
from llmserve.engine.base import Engine
from llmserve.engine.factory import create_engine
from llmserve.limits import Limiter, store_from_url
from llmserve.metrics import Metrics
from llmserve.middleware.auth import auth_middleware
from llmserve.server.app import build_admin_app, build_app
from llmserve.server.heap import PauseRecorder
from llmserve.usage import open_ledger

log = logging.getLogger("llmserve.server")


@dataclass
class Components:
    app: web.Application
    admin_app: web.Application | None = None
    _closers: list[Callable[[], Any]] = field(default_factory=list)

    def on_close(self, closer: Callable[[], Any]) -> None:
        self._closers.append(closer)

    async def close(self) -> None:
        """Close in reverse order of creation; one failing closer does not stop the others."""
        for closer in reversed(self._closers):
            try:
                result = closer()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("error while closing %r", closer)


def build_components(config: Config, *, registry: CollectorRegistry | None = None) -> Components:
    install_redaction()
    closers: list[Callable[[], Any]] = []
    middleware = _auth(config, closers)
    limiter = Limiter(config.limits, store_from_url(config.limits.store, config.limits.state_dir))
    closers.append(limiter.close)
    ledger = open_ledger(config.usage)
    if ledger is not None:
        closers.append(ledger.close)
    metrics = Metrics(registry or CollectorRegistry(), config.metrics, limiter_stats=limiter.stats)
    pauses = PauseRecorder(metrics.observe_gc_pause)
    pauses.install()
    closers.append(pauses.remove)
    engine = create_engine(config.engine)
    admission = AdmissionQueue.from_config(config, observer=metrics.admission_observer())
    app = build_app(config, engine, limiter=limiter, admission=admission, metrics=metrics,
                    ledger=ledger, auth_middleware=middleware)  # fmt: skip
    _bind_metrics(metrics, app, engine, admission, config)
    admin = build_admin_app(app) if config.server.admin_port is not None else None
    components = Components(app=app, admin_app=admin)
    for closer in closers:
        components.on_close(closer)
    return components


def _auth(config: Config, closers: list[Callable[[], Any]]) -> Any:
    store = KeyStore(config.auth.keys) if config.auth.enabled else None
    authenticator = Authenticator(config.auth, store, known_tiers=config.limits.tiers)
    if store is not None:
        closers.append(store.close)
    closers.append(authenticator.close)
    return auth_middleware(authenticator, config.server)


def _bind_metrics(metrics: Metrics, app: web.Application, engine: Engine,
                  admission: AdmissionQueue, config: Config) -> None:  # fmt: skip
    gateway, lifecycle = app[GATEWAY], app[LIFECYCLE]
    metrics.bind(
        queue_depth=lambda: admission.depth,
        in_flight=lambda: lifecycle.in_flight,
        concurrency_limit=lambda: admission.max_concurrency,
        queue_limit=lambda: admission.max_depth,
        engine_stats=engine.stats,
        engine_healthy=lambda: gateway.ready and engine.dead is None,
        model=engine.model_name,
    )
