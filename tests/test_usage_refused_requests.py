"""Requests the limiter or the queue refused add no prompt tokens to metrics or the ledger."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from llmserve.config import MetricsConfig
from llmserve.engine.fake import FakeEngine
from llmserve.limits import Limiter, store_from_url
from llmserve.metrics import Metrics
from llmserve.usage import open_ledger, read_usage
from tests.support.api import chat_body, make_config


async def test_a_429_adds_no_prompt_tokens_to_metrics_or_ledger(app_client, tmp_path):
    config = make_config(tmp_path, limits={
        "default_tier": "t", "tiers": {"t": {"requests_per_minute": 1}}})  # fmt: skip
    limiter = Limiter(config.limits, store_from_url("memory://", tmp_path / "l"))
    registry = CollectorRegistry()
    metrics = Metrics(registry, MetricsConfig(), include_default_registry=False)
    ledger = open_ledger(config.usage)
    client = await app_client(config, FakeEngine("fake", 256), limiter=limiter, metrics=metrics,
                              ledger=ledger)  # fmt: skip
    assert (await client.post("/v1/chat/completions", json=chat_body(max_tokens=2))).status == 200
    for _ in range(5):
        resp = await client.post("/v1/chat/completions", json=chat_body(max_tokens=2))
        assert resp.status == 429
    ledger.close()
    prompt = 4  # "user: hello there\nassistant:"
    entries = list(read_usage(config.usage.ledger))
    assert [(e.status, e.prompt_tokens) for e in entries] == [(200, prompt)], (
        "refused requests are not usage: the ledger holds the one served request only"
    )
    counted = registry.get_sample_value("llmserve_tokens_total", {"type": "prompt", "tier": "t"})
    assert counted == prompt, f"metrics count {counted} prompt tokens, 1 request was served"
    await limiter.close()
