"""Rate limits through real servers: two instances sharing Redis, settlement on disconnect,
Redis dying and coming back."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from llmserve.engine.fake import FakeEngine
from llmserve.limits import Limiter, store_from_url
from tests.support.api import chat_body, make_config
from tests.support.process import llmserve_up
from tests.support.redis_server import start_or_skip

LIMIT = 40  # requests; each costs 5 tokens of a fixed (non-refilling) day window


def limited_config(tmp_path, store, name):
    return {
        "engine": {"kind": "fake", "served_model_name": "fake", "max_model_len": 512},
        "auth": {"enabled": False, "keys": str(tmp_path / f"keys-{name}")},
        "limits": {"store": store, "state_dir": str(tmp_path / f"limits-{name}"),
                   "default_tier": "t", "tiers": {"t": {"tokens_per_day": 5 * LIMIT}}},
        "usage": {"ledger": None},
        "logging": {"access_log": False},
    }  # fmt: skip


async def hammer(urls: list[str], per_server: int) -> dict[int, int]:
    counts: dict[int, int] = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(url: str) -> None:
            async with session.post(url + "/v1/chat/completions", json=chat_body(max_tokens=1,
                                    model="fake")) as resp:  # fmt: skip
                await resp.read()
                counts[resp.status] = counts.get(resp.status, 0) + 1

        async with asyncio.timeout(60):
            await asyncio.gather(*(one(u) for u in urls for _ in range(per_server)))
    return counts


def run_pair(tmp_path, store_a, store_b):
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    with (
        llmserve_up(a_dir, limited_config(a_dir, store_a, "a"), ready_path="/ready") as a,
        llmserve_up(b_dir, limited_config(b_dir, store_b, "b"), ready_path="/ready") as b,
    ):
        return asyncio.run(hammer([a.base_url, b.base_url], 60))


@pytest.mark.redis
def test_two_servers_sharing_redis_never_exceed_the_limit(tmp_path):
    redis = start_or_skip(tmp_path)
    try:
        counts = run_pair(tmp_path, redis.url, redis.url)
    finally:
        redis.stop()
    assert counts == {200: LIMIT, 429: 120 - LIMIT}


def test_two_servers_with_memory_stores_each_admit_their_own_quota(tmp_path):
    # why Redis is needed: two instances, each with its own memory, admit twice the limit
    counts = run_pair(tmp_path, "memory://", "memory://")
    assert counts == {200: 2 * LIMIT, 429: 120 - 2 * LIMIT}


async def test_a_client_gone_after_n_tokens_is_charged_prompt_plus_n(app_client, tmp_path):
    config = make_config(tmp_path, limits={
        "default_tier": "t", "tiers": {"t": {"tokens_per_day": 100_000}}})  # fmt: skip
    limiter = Limiter(config.limits, store_from_url("memory://", tmp_path / "l"))
    engine = FakeEngine("fake", 4096, tokens_per_second=50)
    client = await app_client(config, engine, limiter=limiter)
    resp = await client.post("/v1/chat/completions", json=chat_body(max_tokens=1000, stream=True))
    for _ in range(4):  # the role chunk + 3 tokens (one token per event at 50/s)
        await resp.content.readuntil(b"\n\n")
    resp.close()

    async def used_today() -> float:
        windows = await limiter.usage("anonymous", "t", {})
        return next(w.used for w in windows if w.name == "tokens_per_day")

    async with asyncio.timeout(10):  # the reservation (4 + 1000) is settled after the abort
        while not engine.aborted or await used_today() == 4 + 1000:
            await asyncio.sleep(0.01)
    produced = engine.generated_tokens
    assert 3 <= produced < 1000
    assert await used_today() == 4 + produced  # prompt ("user: hello there\nassistant:") + made
    await limiter.close()


@pytest.mark.redis
async def test_redis_down_then_back_under_a_running_app(app_client, tmp_path):
    redis = start_or_skip(tmp_path)
    try:
        config = make_config(tmp_path, limits={
            "store": redis.url, "default_tier": "t", "on_store_error": "closed",
            "tiers": {"t": {"requests_per_minute": 1000}}})  # fmt: skip
        limiter = Limiter(config.limits, store_from_url(redis.url, tmp_path / "l"),
                          store_retry_seconds=0.2)  # fmt: skip
        client = await app_client(config, FakeEngine("fake", 512), limiter=limiter)
        ok = await client.post("/v1/chat/completions", json=chat_body(max_tokens=1))
        assert ok.status == 200
        redis.stop()
        down = await client.post("/v1/chat/completions", json=chat_body(max_tokens=1))
        assert down.status == 503
        assert (await down.json())["error"]["code"] == "limiter_unavailable"
        assert int(down.headers["Retry-After"]) >= 1
        redis.start()
        async with asyncio.timeout(10):
            while True:
                again = await client.post("/v1/chat/completions", json=chat_body(max_tokens=1))
                if again.status == 200:
                    break
                await asyncio.sleep(0.1)
        assert again.headers["x-ratelimit-limit-requests"] == "1000"
        await limiter.close()
    finally:
        redis.stop()


async def test_a_shadow_refusal_is_served_and_shows_in_the_ledger_and_metrics(
    app_client, tmp_path
):
    from prometheus_client import CollectorRegistry

    from llmserve.config import MetricsConfig
    from llmserve.metrics import Metrics
    from llmserve.usage import open_ledger, read_usage

    config = make_config(tmp_path, server={"public_metrics": True}, limits={
        "default_tier": "t",
        "tiers": {"t": {"requests_per_minute": 100, "shadow": {"requests_per_minute": 2}}},
    })  # fmt: skip
    limiter = Limiter(config.limits, store_from_url("memory://", tmp_path / "l"))
    metrics = Metrics(CollectorRegistry(), MetricsConfig(), limiter_stats=limiter.stats)
    ledger = open_ledger(config.usage)
    client = await app_client(config, FakeEngine("fake", 256), limiter=limiter, metrics=metrics,
                              ledger=ledger)  # fmt: skip
    statuses = [(await client.post("/v1/chat/completions", json=chat_body(max_tokens=2))).status
                for _ in range(3)]  # fmt: skip
    assert statuses == [200, 200, 200]  # shadow limits never refuse
    text = await (await client.get("/metrics")).text()
    assert 'llmserve_limit_shadow_refusals_total{tier="t",window="requests_per_minute"} 1' in text
    assert ledger is not None and config.usage.ledger is not None
    ledger.sync()
    entries = list(read_usage(config.usage.ledger))
    assert [e.shadow_refused for e in entries] == [None, None, "requests_per_minute"]
    ledger.close()
    await limiter.close()
