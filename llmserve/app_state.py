"""Typed application state keys (aiohttp AppKey), shared by the server, middleware and api
layers; a bottom module, so that arrows point down (server -> middleware -> api -> here)."""

from __future__ import annotations

from aiohttp import web

from llmserve.api.gateway import Gateway
from llmserve.config import Config
from llmserve.lifecycle import Lifecycle
from llmserve.metrics import Metrics
from llmserve.usage import UsageLedger

CONFIG = web.AppKey("config", Config)
GATEWAY = web.AppKey("gateway", Gateway)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
METRICS: web.AppKey[Metrics | None] = web.AppKey("metrics")
LEDGER: web.AppKey[UsageLedger | None] = web.AppKey("ledger")
