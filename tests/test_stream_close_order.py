"""When the stream writer fails (client gone), the engine request must stop before the
admission slot is handed back and before the reservation is settled."""

from __future__ import annotations

import asyncio

from llmserve.admission import AdmissionQueue
from llmserve.api import sse as sse_module
from llmserve.engine.fake import FakeEngine
from llmserve.limits import Limiter, store_from_url
from tests.support.api import chat_body, make_config


async def test_engine_is_stopped_before_the_slot_is_released(app_client, tmp_path, monkeypatch):
    config = make_config(tmp_path, limits={
        "default_tier": "t", "tiers": {"t": {"tokens_per_day": 100_000}}})  # fmt: skip
    limiter = Limiter(config.limits, store_from_url("memory://", tmp_path / "l"))
    engine = FakeEngine("fake", 4096, tokens_per_second=200)
    queue = AdmissionQueue(1, 4, 30)
    seen: dict[str, int] = {}

    real_release = queue._release

    def release(ticket):  # what the engine is doing at the moment the slot is given back
        seen.setdefault("running_at_release", engine.running)
        real_release(ticket)

    monkeypatch.setattr(queue, "_release", release)
    real_settlement = limiter.settlement

    def settlement(reservation, prompt, completion):
        seen.setdefault("running_at_settle", engine.running)
        seen.setdefault("settled_completion", completion)
        return real_settlement(reservation, prompt, completion)

    monkeypatch.setattr(limiter, "settlement", settlement)
    writes = 0
    real_write = sse_module.SSEStream.write

    async def flaky_write(self, data):  # the 3rd write finds the client gone
        nonlocal writes
        writes += 1
        if writes == 3:
            raise ConnectionResetError("Cannot write to closing transport")
        await real_write(self, data)

    monkeypatch.setattr(sse_module.SSEStream, "write", flaky_write)
    client = await app_client(config, engine, admission=queue, limiter=limiter)
    resp = await client.post("/v1/chat/completions", json=chat_body(max_tokens=1000, stream=True))
    await resp.read()
    async with asyncio.timeout(5):
        while engine.running:
            await asyncio.sleep(0.01)
    assert seen["running_at_release"] == 0, "slot released while the engine still generates"
    assert seen["running_at_settle"] == 0, "settled while the engine still generates"
    assert seen["settled_completion"] == engine.generated_tokens
    await limiter.close()
