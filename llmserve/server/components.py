"""Compose the server from the config: engine, auth, limiter, admission queue, metrics, ledger."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from llmserve.config import Config
from llmserve.engine.factory import create_engine
from llmserve.server.app import build_app

log = logging.getLogger("llmserve.server")


@dataclass
class Components:
    app: web.Application
    admin_app: web.Application | None = None
    _closers: list[Callable[[], Awaitable[object]]] = field(default_factory=list)

    def on_close(self, closer: Callable[[], Awaitable[object]]) -> None:
        self._closers.append(closer)

    async def close(self) -> None:
        for closer in reversed(self._closers):
            with contextlib.suppress(Exception):
                await closer()


def build_components(config: Config) -> Components:
    engine = create_engine(config.engine)
    app = build_app(config, engine)
    return Components(app=app)
