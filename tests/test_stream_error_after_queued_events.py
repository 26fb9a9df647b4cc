"""Events queued for the SSE writer task all reach the client before a stream's error event.

`SSEStream.send` writes the first event of a loop turn at once and queues the rest for a writer
task. When the engine then fails, the error event must go after that queue: the tokens produced
(and counted, and charged) before the failure all reach the client.
"""

from __future__ import annotations

import json

from llmserve.engine.fake import FakeEngine
from tests.support.api import chat_body, parse_sse


async def test_tokens_before_an_engine_failure_all_reach_the_client(app_client, config):
    # five tokens within one loop turn (the fake engine yields to the loop every 16), then a failure
    engine = FakeEngine("fake", 256, fail_after_tokens=5)
    client = await app_client(config, engine)
    resp = await client.post("/v1/chat/completions", json=chat_body(max_tokens=10, stream=True))
    assert resp.status == 200
    events = parse_sse(await resp.read())
    payloads = [json.loads(e[6:]) for e in events]
    assert payloads[-1]["error"]["code"] == "engine_error"
    text = "".join(p["choices"][0]["delta"].get("content") or "" for p in payloads[:-1])
    # the engine produced five tokens (completion_tokens=5 is settled and logged): the client
    # must get all of them, before the error event
    assert text == "The quick brown fox jumps ", events
