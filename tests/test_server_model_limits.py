"""Per-model windows through the HTTP API (fake engine with LoRA adapters and an alias): the 429
names the window and the model, an alias spends its model's window, other models and the
tier's own windows go on, and /metrics and the ledger count by model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from llmserve.config import Config, MetricsConfig
from llmserve.engine.fake import FakeEngine
from llmserve.limits import Limiter, store_from_url
from llmserve.metrics import Metrics
from llmserve.usage import open_ledger, read_usage
from tests.support.api import make_config


def _config(tmp_path: Path) -> Config:
    return make_config(
        tmp_path,
        server={"public_metrics": True},
        engine={"lora": {"adapters": {"sql": "./adapters/sql", "poet": "./adapters/poet"}},
                "aliases": {"gpt-sql": "sql"}},
        limits={"default_tier": "t", "tiers": {"t": {
            "requests_per_minute": 100, "models": {"sql": {"requests_per_minute": 2}}}}},
    )  # fmt: skip


def _chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def test_a_models_window_answers_429_naming_the_window_and_the_model(
    app_client, tmp_path
) -> None:
    config = _config(tmp_path)
    limiter = Limiter(config.limits, store_from_url("memory://", tmp_path / "l"))
    metrics = Metrics(CollectorRegistry(), MetricsConfig(), limiter_stats=limiter.stats)
    ledger = open_ledger(config.usage)
    client = await app_client(config, FakeEngine.from_config(config.engine), limiter=limiter,
                              metrics=metrics, ledger=ledger)  # fmt: skip

    first = await client.post("/v1/chat/completions", json=_chat("sql"))
    assert first.status == 200
    assert first.headers["x-ratelimit-model_per_key-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-remaining-requests"] == "99"
    alias = await client.post("/v1/chat/completions", json=_chat("gpt-sql"))
    assert alias.status == 200  # the alias runs sql: it spends sql's window
    assert alias.headers["x-ratelimit-model_per_key-remaining-requests"] == "0"

    refused = await client.post("/v1/chat/completions", json=_chat("gpt-sql"))
    assert refused.status == 429
    error = (await refused.json())["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert error["message"].startswith(
        "Rate limit reached on requests per minute for model sql: limit 2, used 2, requested 1."
    )
    assert refused.headers["x-ratelimit-model_per_key-limit-requests"] == "2"
    assert refused.headers["x-ratelimit-model_per_key-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-remaining-requests"] == "98"
    assert refused.headers["Retry-After"] == "30"
    again = await client.post("/v1/completions", json={"model": "sql", "prompt": "x",
                                                         "max_tokens": 2})  # fmt: skip
    assert again.status == 429

    for model in ("poet", "fake"):  # other models, and the tier's own window, go on
        other = await client.post("/v1/chat/completions", json=_chat(model))
        assert other.status == 200, model
        assert "x-ratelimit-model_per_key-limit-requests" not in other.headers
    assert other.headers["x-ratelimit-remaining-requests"] == "96"

    text = await (await client.get("/metrics")).text()
    assert ('llmserve_rate_limit_rejections_total{limit="requests_per_minute",model="sql"} 2.0'
            in text)  # fmt: skip
    assert 'llmserve_model_requests_total{model="sql"} 4.0' in text  # 2 served, 2 refused
    assert 'llmserve_model_requests_total{model="poet"} 1.0' in text
    assert 'llmserve_model_tokens_total{model="sql",type="completion"} 4.0' in text
    assert "gpt-sql" not in text  # counted as the model it stands for

    assert ledger is not None and config.usage.ledger is not None
    ledger.close()
    served = [(e.model, e.status) for e in read_usage(config.usage.ledger)]
    assert served == [("sql", 200), ("gpt-sql", 200), ("poet", 200), ("fake", 200)]
    await limiter.close()


async def test_a_request_refused_before_the_limiter_spends_only_the_tiers_requests(
    app_client, tmp_path
) -> None:
    config = _config(tmp_path)
    limiter = Limiter(config.limits, store_from_url("memory://", tmp_path / "l"))
    client = await app_client(config, FakeEngine.from_config(config.engine), limiter=limiter)
    bad = await client.post("/v1/chat/completions", json={**_chat("sql"), "temperature": "hot"})
    assert bad.status == 400
    windows = {(w.name, w.model): w.used for w in await limiter.usage("anonymous", "t", {})}
    assert windows == {("requests_per_minute", None): 1, ("requests_per_minute", "sql"): 0}
    await limiter.close()
