"""An unexpected (non-APIError) failure after the first byte is an SSE error event."""

from __future__ import annotations

import asyncio

from llmserve.engine.base import Delta
from llmserve.engine.fake import FakeEngine
from tests.support.api import chat_body, parse_sse


class BrokenEngine(FakeEngine):
    async def generate(self, prompt, options, request_id):  # type: ignore[override]
        yield Delta(text="a ", num_tokens=1)
        await asyncio.sleep(0.01)
        raise RuntimeError("a bug below the gateway")


async def test_unexpected_failure_mid_stream_is_an_error_event(app_client, config):
    client = await app_client(config, BrokenEngine("fake", 256))
    resp = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert resp.status == 200
    events = parse_sse(await resp.read())
    assert events[-1].startswith(b'data: {"error"'), f"stream just stops: {events[-1][:80]!r}"
