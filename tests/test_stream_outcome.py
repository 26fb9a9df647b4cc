"""A request's outcome is what its client received: a stream that delivered its last event is a
200 in the ledger and the metrics, even when the request's task is cancelled afterwards (the
client closed while settlement, a Redis round trip, was still on its way)."""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

from llmserve.engine.fake import FakeEngine
from llmserve.records import RequestRecord
from llmserve.request_state import RECORD
from llmserve.server.app import build_app
from tests.support.api import make_config


class RecordingLedger:
    def __init__(self) -> None:
        self.records: list[RequestRecord] = []

    def append(self, record: RequestRecord) -> None:
        self.records.append(record)


async def _finish_then_cancel(request: web.Request, *, delivered: bool) -> web.StreamResponse:
    record = request[RECORD]
    record.admitted = True
    record.route = "chat"  # a generation request: it goes to the ledger
    record.delivered = delivered
    raise asyncio.CancelledError  # the client's close, seen while settlement still runs


async def _outcome(aiohttp_client, tmp_path, *, delivered: bool) -> RequestRecord:
    ledger = RecordingLedger()
    app = build_app(make_config(tmp_path), FakeEngine("fake", 256), ledger=ledger)  # type: ignore[arg-type]

    async def handler(request: web.Request) -> web.StreamResponse:
        return await _finish_then_cancel(request, delivered=delivered)

    app.router.add_post("/v1/test-outcome", handler)
    client = await aiohttp_client(app)
    with contextlib.suppress(Exception):  # no response comes: the task was cancelled
        await client.post("/v1/test-outcome")
    for _ in range(100):
        if ledger.records:
            break
        await asyncio.sleep(0.01)
    return ledger.records[0]


async def test_a_delivered_response_is_a_success_though_its_task_is_cancelled_after(
    aiohttp_client, tmp_path
):
    record = await _outcome(aiohttp_client, tmp_path, delivered=True)
    assert (record.status, record.disconnected) == (200, False)


async def test_an_undelivered_response_whose_task_is_cancelled_is_a_disconnect(
    aiohttp_client, tmp_path
):
    record = await _outcome(aiohttp_client, tmp_path, delivered=False)
    assert (record.status, record.disconnected) == (499, True)
