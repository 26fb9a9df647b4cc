"""429, 503 and disconnects through the wired app land in the exact metric series."""

from __future__ import annotations

import asyncio
import json

from prometheus_client import CollectorRegistry

from llmserve.admission import AdmissionQueue
from llmserve.config import MetricsConfig
from llmserve.engine.fake import FakeEngine
from llmserve.limits import Limiter, store_from_url
from llmserve.metrics import Metrics
from llmserve.usage import read_usage
from tests.support.api import chat_body, make_config


async def test_429_503_and_disconnect_are_counted(app_client, tmp_path):
    config = make_config(tmp_path, limits={
        "default_tier": "t", "tiers": {"t": {"requests_per_minute": 3}}})  # fmt: skip
    registry = CollectorRegistry()
    metrics = Metrics(registry, MetricsConfig(), include_default_registry=False)
    limiter = Limiter(config.limits, store_from_url("memory://", tmp_path / "l"))
    engine = FakeEngine("fake", 256, tokens_per_second=20)
    queue = AdmissionQueue(1, 0, 30)
    client = await app_client(config, engine, limiter=limiter, admission=queue, metrics=metrics)

    slow = await client.post("/v1/chat/completions", json=chat_body(max_tokens=50, stream=True))
    await slow.content.readuntil(b"\n\n")  # running: holds the only slot
    busy = await client.post("/v1/chat/completions", json=chat_body(max_tokens=1))
    assert busy.status == 503
    slow.close()  # the client vanishes mid-stream
    while engine.running:
        await asyncio.sleep(0.01)
    ok = await client.post("/v1/chat/completions", json=chat_body(max_tokens=2))
    assert ok.status == 200
    limited = await client.post("/v1/chat/completions", json=chat_body(max_tokens=1))
    assert limited.status == 429

    value = registry.get_sample_value
    assert (
        value(
            "llmserve_requests_total",
            {"route": "chat", "status": "503", "code": "server_overloaded"},
        )
        == 1
    )
    assert (
        value(
            "llmserve_requests_total",
            {"route": "chat", "status": "429", "code": "rate_limit_exceeded"},
        )
        == 1
    )
    rejections = "llmserve_rate_limit_rejections_total"
    assert value(rejections, {"limit": "requests_per_minute", "model": ""}) == 1
    assert value("llmserve_client_disconnects_total", {"route": "chat"}) == 1
    assert value("llmserve_requests_total", {"route": "chat", "status": "200", "code": ""}) == 1
    assert value("llmserve_tokens_total", {"type": "completion", "tier": "t"}) >= 2
    assert value("llmserve_queue_wait_seconds_count") >= 2
    await limiter.close()


async def test_the_ledger_gets_one_record_per_generation_request(app_client, tmp_path):
    from llmserve.usage import UsageLedger

    config = make_config(tmp_path)
    ledger = UsageLedger(tmp_path / "ledger.jsonl", 1 << 20, 2)
    client = await app_client(config, FakeEngine("fake", 256), ledger=ledger)
    await client.post("/v1/chat/completions", json=chat_body(max_tokens=3),
                      headers={"X-Request-Id": "led-1"})  # fmt: skip
    await client.post("/v1/chat/completions", json=chat_body(model="nope"))
    await client.get("/v1/models")
    ledger.close()
    entries = list(read_usage(tmp_path / "ledger.jsonl"))
    assert entries[0].request_id == "led-1"
    assert len(entries) == 1  # the 404 was refused before the limiter; /v1/models is no usage
    first = json.loads((tmp_path / "ledger.jsonl").read_text().splitlines()[0])
    assert first["completion_tokens"] == 3 and first["prompt_tokens"] == 4
    assert first["status"] == 200 and first["finish_reason"] == "length"


async def test_a_flood_of_refusals_writes_nothing_to_the_ledger(app_client, tmp_path):
    """401s, 429s and invalid bodies are counted by the metrics, not written as usage: a flood of
    them would otherwise rotate real usage out of the ledger."""
    from llmserve.auth.authenticator import Authenticator
    from llmserve.auth.keys import KeyStore
    from llmserve.limits import Limiter, store_from_url
    from llmserve.middleware.auth import auth_middleware
    from llmserve.usage import UsageLedger

    config = make_config(tmp_path, auth={"enabled": True}, limits={
        "default_tier": "t", "tiers": {"t": {"requests_per_minute": 1}}})  # fmt: skip
    ledger = UsageLedger(tmp_path / "ledger.jsonl", 1 << 20, 2)
    limiter = Limiter(config.limits, store_from_url("memory://", tmp_path / "l"))
    with KeyStore(tmp_path / "keys") as keys:
        _, key = keys.create("flood")
        auth = auth_middleware(Authenticator(config.auth, keys), config.server)
        client = await app_client(config, FakeEngine("fake", 256), limiter=limiter,
                                  ledger=ledger, auth_middleware=auth)  # fmt: skip

        async def post(api_key: str, **kw: object) -> int:
            kw.setdefault("json", chat_body(max_tokens=1))
            headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
            return (await client.post("/v1/chat/completions", headers=headers, **kw)).status

        statuses = [await post(key) for _ in range(4)]
        forged = [await post("sk-llms-forged") for _ in range(3)]
        bad = await post(key, json=None, data=b"{not json")
    ledger.close()
    assert statuses == [200, 429, 429, 429] and forged == [401] * 3 and bad in (400, 429)
    assert [e.status for e in read_usage(tmp_path / "ledger.jsonl")] == [200]
    await limiter.close()
