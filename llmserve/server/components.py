"""Compose the server from the config: engine, auth, limiter, admission queue, metrics, ledger."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from llmserve.auth.authenticator import Authenticator
from llmserve.auth.keys import KeyStore
from llmserve.auth.redact import install_redaction
from llmserve.config import Config
from llmserve.engine.factory import create_engine
from llmserve.middleware.auth import auth_middleware
from llmserve.server.app import build_admin_app, build_app

log = logging.getLogger("llmserve.server")


@dataclass
class Components:
    app: web.Application
    admin_app: web.Application | None = None
    _closers: list[Callable[[], Any]] = field(default_factory=list)

    def on_close(self, closer: Callable[[], Any]) -> None:
        self._closers.append(closer)

    async def close(self) -> None:
        for closer in reversed(self._closers):
            try:
                result = closer()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("error while closing %r", closer)


def build_components(config: Config) -> Components:
    install_redaction()
    closers: list[Callable[[], Any]] = []
    middleware = _auth(config, closers)
    engine = create_engine(config.engine)
    app = build_app(config, engine, auth_middleware=middleware)
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

