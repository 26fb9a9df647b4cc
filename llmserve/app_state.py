"""Typed application state keys (aiohttp AppKey), shared by the server, middleware and api
layers; a bottom module, so that arrows point down (server -> middleware -> api -> here)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from llmserve.api.gateway import Gateway
from llmserve.config import Config
from llmserve.lifecycle import Lifecycle
from llmserve.metrics import Metrics
from llmserve.usage import UsageLedger

if TYPE_CHECKING:
    from llmserve.auth.authenticator import Authenticator
    from llmserve.server.reload import Reloader

CONFIG = web.AppKey("config", Config)
GATEWAY = web.AppKey("gateway", Gateway)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
METRICS: web.AppKey[Metrics | None] = web.AppKey("metrics")
LEDGER: web.AppKey[UsageLedger | None] = web.AppKey("ledger")
AUTHENTICATOR: web.AppKey[Authenticator | None] = web.AppKey("authenticator")
RELOADER: web.AppKey[Reloader | None] = web.AppKey("reloader")  # set once the server runs
