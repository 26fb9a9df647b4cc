"""Typed per-request state (aiohttp RequestKey), shared by middleware and handlers."""

from __future__ import annotations

from aiohttp import web

from llmserve.auth.principal import Principal
from llmserve.records import RequestRecord

RECORD = web.RequestKey("record", RequestRecord)  # what metrics and the ledger get at the end
STARTED = web.RequestKey("started", float)  # loop time when the request arrived
PRINCIPAL = web.RequestKey("principal", Principal)  # who is calling (set by the auth middleware)
