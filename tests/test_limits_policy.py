"""What the limiter does when its store fails, and what it must never ask of the store."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from llmserve.clock import ManualClock
from llmserve.config import LimitsConfig, TierConfig
from llmserve.errors import ConfigError, RateLimited, ServiceUnavailable
from llmserve.limits import Limiter, StoreUnavailable, store_from_url
from llmserve.limits.stores.base import Hold, ReserveOutcome
from llmserve.limits.stores.memory import MemoryStore
from llmserve.limits.stores.redis import RedisStore
from llmserve.limits.windows import WindowCharge


class FlakyStore:
    """A memory store that can be switched off; counts the calls that reach it."""

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.down = False
        self.calls = 0

    leases = False

    async def reserve(self, principal_id: str, hold: Hold) -> ReserveOutcome:
        self._touch()
        return await self.inner.reserve(principal_id, hold)

    async def settle(
        self, principal_id: str, hold: Hold, actual: Sequence[int], now: float
    ) -> None:
        self._touch()
        await self.inner.settle(principal_id, hold, actual, now)

    async def renew(self, holds: Sequence[tuple[str, Hold]], until: float) -> None:
        self._touch()

    async def peek(
        self, principal_id: str, charges: Sequence[WindowCharge], now: float
    ) -> tuple[float, ...]:
        self._touch()
        return await self.inner.peek(principal_id, charges, now)

    async def close(self) -> None:
        await self.inner.close()

    def _touch(self) -> None:
        self.calls += 1
        if self.down:
            raise StoreUnavailable("connection refused")


def limiter(policy: str = "closed", **tier: int) -> tuple[Limiter, FlakyStore, ManualClock]:
    config = LimitsConfig(on_store_error=policy, tiers={"default": TierConfig(**tier)})
    store, clock = FlakyStore(), ManualClock(1_700_000_000.0)
    return Limiter(config, store, clock), store, clock


async def test_tier_without_limits_never_touches_the_store() -> None:
    limits, store, _ = limiter()
    reservation = await limits.reserve("alice", None, {}, 100, 100)
    await limits.settle(reservation, 100, 3)
    assert await limits.usage("alice", None, {}) == []
    assert store.calls == 0
    assert reservation.headers == {}


async def test_closed_policy_answers_503_with_retry_after() -> None:
    limits, store, _ = limiter("closed", tokens_per_minute=1000)
    store.down = True
    with pytest.raises(ServiceUnavailable) as refused:
        await limits.reserve("alice", None, {}, 10, 10)
    assert refused.value.status == 503
    assert refused.value.code == "limiter_unavailable"
    assert refused.value.headers["Retry-After"] == "1"
    assert limits.stats.rejected_unavailable == 1 and limits.stats.store_errors == 1


async def test_open_policy_admits_unchecked_and_charges_the_real_cost_once_the_store_is_back(
) -> None:
    limits, store, clock = limiter("open", tokens_per_day=1000)
    store.down = True
    reservation = await limits.reserve("alice", None, {}, 10, 10)
    assert not reservation.checked
    await limits.settle(reservation, 10, 5)  # the store is still down: kept for later
    assert limits.stats.admitted_unchecked == 1
    assert limits.stats.settlements_pending == 1 and limits.stats.settlements_lost == 0
    store.down = False
    clock.now += 1.0
    [day] = await limits.usage("alice", None, {})  # a call that succeeds sends what waits
    await asyncio.sleep(0)
    [day] = await limits.usage("alice", None, {})
    assert day.used == 15  # what the request used, not 0 and not its worst case
    assert limits.stats.settlements_pending == 0
    await limits.close()


async def test_a_failed_store_is_left_alone_until_the_retry_time() -> None:
    limits, store, clock = limiter("closed", tokens_per_minute=1000)
    store.down = True
    for _ in range(5):
        with pytest.raises(ServiceUnavailable):
            await limits.reserve("alice", None, {}, 10, 10)
    assert store.calls == 1  # one timeout's worth of waiting, not five
    store.down = False
    clock.now += 1.0
    await limits.reserve("alice", None, {}, 10, 10)
    assert store.calls == 2


async def test_limits_are_enforced_again_once_the_store_is_back() -> None:
    limits, store, clock = limiter("open", tokens_per_minute=100)
    store.down = True
    for _ in range(3):
        await limits.reserve("alice", None, {}, 50, 50)  # unchecked
    store.down = False
    clock.now += 1.0
    await limits.reserve("alice", None, {}, 50, 50)
    with pytest.raises(RateLimited):
        await limits.reserve("alice", None, {}, 50, 50)


async def test_a_settlement_during_an_outage_is_kept_and_sent_once_the_store_is_back() -> None:
    limits, store, clock = limiter("closed", tokens_per_day=1000)
    reservation = await limits.reserve("alice", None, {}, 10, 100)
    store.down = True
    await limits.settle(reservation, 10, 1)
    assert reservation.finished
    assert limits.stats.settlements_deferred == 1 and limits.stats.settlements_pending == 1
    store.down = False
    clock.now += 1.0
    await limits.reserve("bob", None, {}, 1, 1)  # the store answers: the backlog goes out
    await asyncio.sleep(0)
    [day] = await limits.usage("alice", None, {})
    assert day.used == 11
    assert limits.stats.settlements_pending == 0 and limits.stats.settlements_lost == 0
    await limits.close()


async def test_a_reservation_that_timed_out_is_cancelled_once_the_store_is_back() -> None:
    """The store ran the reserve but its answer never came (Redis paused): the client got a
    503, so the hold must not stay charged."""
    limits, store, clock = limiter("closed", tokens_per_day=1000)
    real_reserve = store.inner.reserve

    async def reserve_then_fail(principal_id: str, hold: Hold) -> ReserveOutcome:
        await real_reserve(principal_id, hold)  # it ran...
        raise StoreUnavailable("timeout")  # ...and its reply was lost

    store.inner.reserve = reserve_then_fail  # type: ignore[method-assign]
    with pytest.raises(ServiceUnavailable):
        await limits.reserve("alice", None, {}, 10, 500)
    store.inner.reserve = real_reserve  # type: ignore[method-assign]
    clock.now += 1.0
    [day] = await limits.usage("alice", None, {})
    await asyncio.sleep(0)
    [day] = await limits.usage("alice", None, {})
    assert day.used == 0, "a request refused with 503 stays charged"
    await limits.close()


async def test_usage_during_an_outage_is_an_error_whatever_the_policy() -> None:
    limits, store, _ = limiter("open", tokens_per_minute=1000)
    store.down = True
    with pytest.raises(ServiceUnavailable):
        await limits.usage("alice", None, {})


async def test_a_request_that_holds_no_tokens_costs_one_store_call() -> None:
    limits, store, _ = limiter("closed", requests_per_minute=10, tokens_per_minute=1000)
    reservation = await limits.reserve("alice", None, {}, 0, 0)
    await limits.settle(reservation, 0, 0)
    assert store.calls == 1
    assert reservation.hold is not None and reservation.hold.id == ""


def test_store_url_chooses_the_store(tmp_path: Path) -> None:
    assert isinstance(store_from_url("memory://", tmp_path), MemoryStore)
    redis = store_from_url("redis://127.0.0.1:1/0?key_prefix=blue:")
    assert isinstance(redis, RedisStore)
    assert redis.key("alice", _minute()) == "blue:{alice}:tokens_per_minute"


@pytest.mark.parametrize("url", ["memcached://localhost", "localhost:6379", "mem://"])
def test_unknown_store_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match="unknown store"):
        store_from_url(url)


def _minute() -> WindowCharge:
    return WindowCharge("tokens_per_minute", "bucket", 1000, 1000 / 60, 0, 0.0, 1)
