"""The Redis store against a real server: one round trip per decision, surviving a restart."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from llmserve.config import LimitsConfig, TierConfig
from llmserve.errors import RateLimited, ServiceUnavailable
from llmserve.limits import Limiter
from llmserve.limits.stores.redis import RedisStore
from tests.support.redis_server import RedisServer, start_or_skip

pytestmark = pytest.mark.redis
_prefixes = itertools.count()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_741_953_600.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """One server per test: these tests kill it."""
    server = start_or_skip(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    store = RedisStore.from_url(redis_server.url, key_prefix=f"t{next(_prefixes)}:")
    yield store
    await store.close()


def make_limiter(store: RedisStore, policy: str = "closed", **tier: int) -> Limiter:
    config = LimitsConfig(on_store_error=policy, tiers={"default": TierConfig(**tier)})
    return Limiter(config, store, FakeClock())


def past_retry_time(limiter: Limiter) -> None:
    """Move the limiter's clock past the moment it tries a failed store again."""
    limiter._clock.now += 1.0  # type: ignore[attr-defined]


class CommandCounter:
    """Counts the commands the client sends: each one is a network round trip."""

    def __init__(self, store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.names: list[str] = []
        send = store.client.execute_command

        async def counted(*args: Any, **options: Any) -> Any:
            self.names.append(str(args[0]).upper())
            return await send(*args, **options)

        monkeypatch.setattr(store.client, "execute_command", counted)


async def test_reserve_and_settle_are_one_round_trip_each(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    limiter = make_limiter(
        store, requests_per_minute=100, tokens_per_minute=10_000, tokens_per_day=50_000
    )
    await limiter.release(await limiter.reserve("alice", None, {}, 10, 10))  # loads the scripts
    counter = CommandCounter(store, monkeypatch)
    reservation = await limiter.reserve("alice", None, {}, 100, 500)
    assert counter.names == ["EVALSHA"]
    await limiter.settle(reservation, 100, 20)
    assert counter.names == ["EVALSHA", "EVALSHA"]
    usage = {w.name: w.used for w in await limiter.usage("alice", None, {})}
    assert usage == {"requests_per_minute": 2, "tokens_per_minute": 120, "tokens_per_day": 120}


async def test_closed_policy_refuses_while_redis_is_down_then_recovers(
    redis_server: RedisServer, store: RedisStore
) -> None:
    limiter = make_limiter(store, "closed", tokens_per_minute=1000)
    await limiter.reserve("alice", None, {}, 100, 100)
    held = await limiter.reserve("alice", None, {}, 100, 100)

    redis_server.stop()
    outcomes = await asyncio.gather(
        *(limiter.reserve("alice", None, {}, 100, 100) for _ in range(20)),
        return_exceptions=True,
    )
    assert all(isinstance(o, ServiceUnavailable) for o in outcomes), outcomes
    refused = outcomes[0]
    assert refused.code == "limiter_unavailable"
    assert refused.headers["Retry-After"] == "1"
    await limiter.settle(held, 100, 10)  # must not raise mid-outage
    assert limiter.stats.settlements_lost == 1

    redis_server.start()  # same port, empty (no persistence), same client and limiter
    past_retry_time(limiter)
    for _ in range(5):
        await limiter.reserve("alice", None, {}, 100, 100)
    with pytest.raises(RateLimited):
        await limiter.reserve("alice", None, {}, 100, 100)
    assert limiter.stats.rejected_unavailable == 20


async def test_open_policy_admits_while_redis_is_down_then_enforces_again(
    redis_server: RedisServer, store: RedisStore
) -> None:
    limiter = make_limiter(store, "open", requests_per_minute=2)
    redis_server.stop()
    for _ in range(4):
        assert (await limiter.reserve("alice", None, {}, 1, 1)).charges == ()
    assert limiter.stats.admitted_unchecked == 4

    redis_server.start()
    past_retry_time(limiter)
    await limiter.reserve("alice", None, {}, 1, 1)
    await limiter.reserve("alice", None, {}, 1, 1)
    with pytest.raises(RateLimited):
        await limiter.reserve("alice", None, {}, 1, 1)
    assert limiter.stats.admitted_unchecked == 4
