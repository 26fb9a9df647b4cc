"""At the end of the shutdown grace time a running non-streaming request gets a 503."""

from __future__ import annotations

import asyncio

import aiohttp

from llmserve.app_state import GATEWAY, LIFECYCLE
from llmserve.engine.fake import FakeEngine
from tests.support.api import chat_body


async def test_forced_stop_answers_a_json_request_with_503(app_client, config):
    engine = FakeEngine("fake", 256, tokens_per_second=20)
    client = await app_client(config, engine)
    pending = asyncio.ensure_future(
        client.post("/v1/chat/completions", json=chat_body(max_tokens=100))
    )
    async with asyncio.timeout(5):
        while engine.running == 0:
            await asyncio.sleep(0.01)
    client.app[GATEWAY].force_stopping = True  # what run._drain does when grace is over
    client.app[LIFECYCLE].cancel_all()
    try:
        resp = await pending
    except aiohttp.ClientError as exc:
        raise AssertionError(f"the client got no answer at all: {exc!r}") from None
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "shutting_down"
