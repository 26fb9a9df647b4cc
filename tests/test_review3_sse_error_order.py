"""Review: events queued for the writer task are lost when the stream ends with an error event."""

from __future__ import annotations

import json

from llmserve.engine.fake import FakeEngine
from tests.support.api import chat_body, parse_sse


async def test_tokens_before_an_engine_failure_all_reach_the_client(app_client, config):
    # five tokens in one loop turn (the fake engine only yields to the loop every 16), then a failure
    engine = FakeEngine("fake", 256, fail_after_tokens=5)
    client = await app_client(config, engine)
    resp = await client.post("/v1/chat/completions", json=chat_body(max_tokens=10, stream=True))
    assert resp.status == 200
    events = parse_sse(await resp.read())
    payloads = [json.loads(e[6:]) for e in events]
    assert "error" in payloads[-1]
    text = "".join(p["choices"][0]["delta"].get("content") or "" for p in payloads[:-1])
    # the engine produced (and the ledger charges) five tokens: the client must see all of them,
    # before the error event
    assert text == "The quick brown fox jumps ", events
