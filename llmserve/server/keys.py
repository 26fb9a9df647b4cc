"""Typed application state keys (aiohttp AppKey)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from llmserve.api.gateway import Gateway
from llmserve.config import Config
from llmserve.server.lifecycle import Lifecycle

CONFIG = web.AppKey("config", Config)
GATEWAY = web.AppKey("gateway", Gateway)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
METRICS = web.AppKey("metrics", Any)  # llmserve.metrics.Metrics, or None
LEDGER = web.AppKey("ledger", Any)  # llmserve.usage.UsageLedger, or None
