"""Only validated model names reach the usage ledger (unknown names cannot flood it)."""

from __future__ import annotations

from llmserve.engine.fake import FakeEngine
from llmserve.usage import open_ledger, read_usage
from tests.support.api import chat_body, make_config


async def test_unknown_model_names_cannot_flood_the_ledger(app_client, tmp_path):
    config = make_config(tmp_path, usage={"max_bytes": 1024 * 1024, "backups": 1})
    ledger = open_ledger(config.usage)
    client = await app_client(config, FakeEngine("fake", 256), ledger=ledger)
    assert (await client.post("/v1/chat/completions", json=chat_body(max_tokens=2))).status == 200
    for _ in range(3):  # 404s: rejected before the limiter, so no rate limit applies either
        resp = await client.post("/v1/chat/completions",
                                 json={**chat_body(), "model": "x" * 1_500_000})  # fmt: skip
        assert resp.status == 404
    ledger.close()
    entries = list(read_usage(config.usage.ledger))
    assert any(e.status == 200 for e in entries), "the paid request was rotated out of the ledger"
    assert max(len(e.model or "") for e in entries) <= 256, "a 1.5 MB model name was logged"
