"""The limiter's behaviour, run against every store: memory, and a real Redis server.

The clock is injected, so refills, resets and Retry-After values are exact and no test sleeps.
"""

from __future__ import annotations

import asyncio
import calendar
import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from llmserve.clock import ManualClock
from llmserve.config import LimitsConfig, TierConfig
from llmserve.errors import RateLimited
from llmserve.limits import Limiter, Store
from llmserve.limits.stores.memory import MemoryStore
from llmserve.limits.stores.redis import RedisStore
from tests.support.redis_server import RedisServer, start_or_skip

NOON = float(calendar.timegm((2025, 3, 14, 12, 0, 0)))
_prefixes = itertools.count()


def limits(**tier: Any) -> LimitsConfig:
    return LimitsConfig(tiers={"default": TierConfig(**tier)})


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_or_skip(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


StoreFactory = Callable[[], Store]


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def new_store(request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    """Makes stores as deployments would: Redis ones share state, memory ones do not."""
    made: list[Store] = []
    prefix = f"test{next(_prefixes)}:"  # a fresh keyspace per test, no FLUSHDB needed

    def make() -> Store:
        if request.param == "memory":
            store: Store = MemoryStore()
        else:
            server = request.getfixturevalue("redis_server")
            store = RedisStore.from_url(server.url, key_prefix=prefix)
        made.append(store)
        return store

    make.shared = request.param == "redis"  # type: ignore[attr-defined]
    yield make
    for store in made:
        await store.close()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(NOON)


def limiter_for(new_store: StoreFactory, clock: ManualClock, **tier: Any) -> Limiter:
    return Limiter(limits(**tier), new_store(), clock)


async def test_requests_per_minute_refuses_the_extra_request_with_exact_retry_after(
    new_store: StoreFactory, clock: ManualClock
) -> None:
    limiter = limiter_for(new_store, clock, requests_per_minute=3)
    for _ in range(3):
        await limiter.reserve("alice", None, {}, 10, 10)
    with pytest.raises(RateLimited) as denied:
        await limiter.reserve("alice", None, {}, 10, 10)
    # 3 per minute drain one every 20 s: the 4th fits exactly 20 s later.
    assert denied.value.headers["Retry-After"] == "20"
    assert "requests per minute: limit 3, used 3, requested 1" in denied.value.message
    clock.advance(19.9)
    with pytest.raises(RateLimited):
        await limiter.reserve("alice", None, {}, 10, 10)
    clock.advance(0.1)
    await limiter.reserve("alice", None, {}, 10, 10)


async def test_tokens_per_minute_refill_continuously(
    new_store: StoreFactory, clock: ManualClock
) -> None:
    limiter = limiter_for(new_store, clock, tokens_per_minute=600)  # 10 tokens/s
    await limiter.reserve("alice", None, {}, 100, 500)
    with pytest.raises(RateLimited) as denied:
        await limiter.reserve("alice", None, {}, 50, 50)
    assert denied.value.status == 429 and denied.value.code == "rate_limit_exceeded"
    assert denied.value.headers["Retry-After"] == "10"
    assert "Please try again in 10s" in denied.value.message
    clock.advance(5)
    with pytest.raises(RateLimited) as denied:
        await limiter.reserve("alice", None, {}, 50, 50)
    assert denied.value.headers["Retry-After"] == "5"
    clock.advance(5)
    await limiter.reserve("alice", None, {}, 50, 50)


async def test_principals_have_separate_windows(
    new_store: StoreFactory, clock: ManualClock
) -> None:
    limiter = limiter_for(new_store, clock, requests_per_minute=1)
    await limiter.reserve("alice", None, {}, 1, 1)
    await limiter.reserve("bob", None, {}, 1, 1)
    with pytest.raises(RateLimited):
        await limiter.reserve("alice", None, {}, 1, 1)


async def test_request_bigger_than_the_window_says_it_never_fits(
    new_store: StoreFactory, clock: ManualClock
) -> None:
    limiter = limiter_for(new_store, clock, tokens_per_minute=1000)
    with pytest.raises(RateLimited) as denied:
        await limiter.reserve("alice", None, {}, 200, 900)
    assert "Retry-After" not in denied.value.headers
    assert denied.value.headers["x-should-retry"] == "false"  # the OpenAI SDKs then do not retry
    assert denied.value.headers["x-ratelimit-limit-tokens"] == "1000"
    assert "needs 1100 tokens" in denied.value.message
    assert "tokens per minute limit is 1000" in denied.value.message
    assert "never" in denied.value.message
    await limiter.reserve("alice", None, {}, 200, 800)  # nothing was charged for it


async def test_reservation_is_all_or_nothing_across_windows(
    new_store: StoreFactory, clock: ManualClock
) -> None:
    limiter = limiter_for(new_store, clock, tokens_per_minute=1000, tokens_per_day=1500)
    await limiter.settle(await limiter.reserve("alice", None, {}, 500, 500), 500, 500)
    clock.advance(60)  # the minute bucket is empty again; the day holds 1000
    with pytest.raises(RateLimited) as denied:
        await limiter.reserve("alice", None, {}, 300, 300)
    assert "tokens per day: limit 1500, used 1000, requested 600" in denied.value.message
    assert denied.value.headers["Retry-After"] == str(12 * 3600 - 60)  # until UTC midnight
    # the tokens headers describe the window that refused: the day's budget, not the minute's
    assert denied.value.headers["x-ratelimit-limit-tokens"] == "1500"
    assert denied.value.headers["x-ratelimit-remaining-tokens"] == "500"
    usage = {w.name: w.used for w in await limiter.usage("alice", None, {})}
    assert usage == {"tokens_per_minute": 0, "tokens_per_day": 1000}  # minute not charged


async def test_a_day_full_of_holds_in_flight_says_retry_in_a_second_not_at_midnight(
    new_store: StoreFactory, clock: ManualClock
) -> None:
    limiter = limiter_for(new_store, clock, tokens_per_day=1500)
    settled = await limiter.reserve("alice", None, {}, 100, 400)
    await limiter.settle(settled, 100, 400)  # 500 used for good
    in_flight = await limiter.reserve("alice", None, {}, 100, 900)  # holds 1000 for now
    with pytest.raises(RateLimited) as denied:
        await limiter.reserve("alice", None, {}, 100, 100)
    # the worst case of the request in flight fills the day; most of it comes back when it
    # ends, so the caller is told to retry in a second, not at midnight
    assert denied.value.headers["Retry-After"] == "1"
    assert "1000 of the tokens per day used are held by requests still in flight" in (
        denied.value.message
    )
    await limiter.settle(in_flight, 100, 20)
    await limiter.reserve("alice", None, {}, 100, 100)  # the retry fits
    with pytest.raises(RateLimited) as full:
        await limiter.reserve("alice", None, {}, 100, 900)  # 1420 + 1000: only midnight helps
    assert full.value.headers["Retry-After"] == str(12 * 3600)


async def test_day_window_resets_at_utc_midnight(new_store: StoreFactory) -> None:
    clock = ManualClock(float(calendar.timegm((2025, 3, 14, 23, 59, 0))))
    limiter = limiter_for(new_store, clock, tokens_per_day=1000)
    admitted = await limiter.reserve("alice", None, {}, 400, 600)
    assert admitted.headers["x-ratelimit-reset-tokens"] == "1m0s"
    await limiter.settle(admitted, 400, 600)
    with pytest.raises(RateLimited) as denied:
        await limiter.reserve("alice", None, {}, 1, 0)
    assert denied.value.headers["Retry-After"] == "60"
    clock.advance(59.999)
    with pytest.raises(RateLimited):
        await limiter.reserve("alice", None, {}, 1, 0)
    clock.advance(0.001)
    admitted = await limiter.reserve("alice", None, {}, 400, 600)
    assert admitted.headers["x-ratelimit-remaining-tokens"] == "0"


async def test_month_window_resets_on_the_first_at_utc_midnight(new_store: StoreFactory) -> None:
    clock = ManualClock(float(calendar.timegm((2024, 12, 31, 23, 0, 0))))
    limiter = limiter_for(new_store, clock, tokens_per_month=5000)
    admitted = await limiter.reserve("alice", None, {}, 2000, 3000)
    assert admitted.headers["x-ratelimit-reset-tokens"] == "1h0m0s"
    await limiter.settle(admitted, 2000, 3000)
    with pytest.raises(RateLimited) as denied:
        await limiter.reserve("alice", None, {}, 10, 0)
    assert denied.value.headers["Retry-After"] == "3600"
    assert "tokens per month" in denied.value.message
    clock.advance(3600)  # 2025-01-01 00:00 UTC
    await limiter.reserve("alice", None, {}, 2000, 3000)


async def test_headers_follow_openai_names_and_formats(
    new_store: StoreFactory, clock: ManualClock
) -> None:
    limiter = limiter_for(new_store, clock, requests_per_minute=60, tokens_per_minute=1000)
    reservation = await limiter.reserve("alice", None, {}, 40, 60)
    assert reservation.headers == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "900",
        "x-ratelimit-reset-tokens": "6s",
    }
    with pytest.raises(RateLimited) as denied:
        await limiter.reserve("alice", None, {}, 900, 100)
    assert denied.value.headers["x-ratelimit-remaining-tokens"] == "900"
    assert denied.value.headers["x-ratelimit-remaining-requests"] == "59"  # not charged either


async def test_settle_replaces_the_hold_with_the_real_cost(
    new_store: StoreFactory, clock: ManualClock
) -> None:
    limiter = limiter_for(new_store, clock, tokens_per_minute=1000, tokens_per_day=10_000)
    reservation = await limiter.reserve("alice", None, {}, 100, 800)
    assert reservation.token_cost == 900
    # The client went away after 50 tokens: it pays prompt + 50, not max_tokens.
    await limiter.settle(reservation, 100, 50)
    usage = {w.name: w.used for w in await limiter.usage("alice", None, {})}
    assert usage == {"tokens_per_minute": 150, "tokens_per_day": 150}
    await limiter.reserve("alice", None, {}, 50, 800)  # 850 more fits beside 150


async def test_completion_tokens_are_weighted(new_store: StoreFactory, clock: ManualClock) -> None:
    limiter = limiter_for(new_store, clock, tokens_per_day=10_000, completion_token_weight=1.5)
    reservation = await limiter.reserve("alice", None, {}, 100, 101)
    assert reservation.token_cost == 100 + 152  # 151.5 rounded up
    await limiter.settle(reservation, 100, 10)
    assert [w.used for w in await limiter.usage("alice", None, {})] == [115]


async def test_settling_twice_or_releasing_after_settling_refunds_once(
    new_store: StoreFactory, clock: ManualClock
) -> None:
    limiter = limiter_for(new_store, clock, tokens_per_day=10_000)
    reservation = await limiter.reserve("alice", None, {}, 100, 900)
    await asyncio.gather(*(limiter.settle(reservation, 100, 200) for _ in range(5)))
    await limiter.settle(reservation, 0, 0)
    await limiter.release(reservation)
    assert [w.used for w in await limiter.usage("alice", None, {})] == [300]
    assert reservation.finished


async def test_release_refunds_tokens_but_the_request_still_counts(
    new_store: StoreFactory, clock: ManualClock
) -> None:
    limiter = limiter_for(new_store, clock, requests_per_minute=2, tokens_per_minute=1000)
    reservation = await limiter.reserve("alice", None, {}, 100, 400)
    await limiter.release(reservation)
    await limiter.release(reservation)
    usage = {w.name: w.used for w in await limiter.usage("alice", None, {})}
    assert usage == {"requests_per_minute": 1, "tokens_per_minute": 0}


async def test_key_overrides_replace_the_tier_limits(
    new_store: StoreFactory, clock: ManualClock
) -> None:
    limiter = limiter_for(new_store, clock, tokens_per_minute=100)
    await limiter.reserve("big", None, {"tokens_per_minute": 5000}, 1000, 3000)
    with pytest.raises(RateLimited):
        await limiter.reserve("small", None, {}, 100, 100)


async def test_200_concurrent_reservations_admit_exactly_what_fits(
    new_store: StoreFactory, clock: ManualClock
) -> None:
    limiter = limiter_for(new_store, clock, tokens_per_minute=10_000)
    results = await asyncio.gather(
        *(limiter.reserve("alice", None, {}, 50, 100) for _ in range(200)),
        return_exceptions=True,
    )
    admitted = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, RateLimited)]
    assert len(admitted) == 10_000 // 150 == 66
    assert len(refused) == 200 - 66
    assert [w.used for w in await limiter.usage("alice", None, {})] == [66 * 150]


async def test_two_limiters_share_limits_only_through_a_shared_store(
    new_store: StoreFactory, clock: ManualClock
) -> None:
    """Two limiters stand for two server processes. Redis: one quota between them.
    Memory: each process has its own state, so together they admit twice the quota."""
    config = limits(requests_per_minute=1000, tokens_per_minute=3000)
    first, second = Limiter(config, new_store(), clock), Limiter(config, new_store(), clock)
    attempts = [first.reserve("alice", None, {}, 10, 20) for _ in range(150)]
    attempts += [second.reserve("alice", None, {}, 10, 20) for _ in range(150)]
    results = await asyncio.gather(*attempts, return_exceptions=True)
    admitted = sum(not isinstance(r, BaseException) for r in results)
    quota = 3000 // 30
    assert admitted == (quota if new_store.shared else 2 * quota)  # type: ignore[attr-defined]


async def test_usage_reports_every_window(new_store: StoreFactory, clock: ManualClock) -> None:
    limiter = limiter_for(
        new_store,
        clock,
        requests_per_minute=10,
        tokens_per_minute=1000,
        tokens_per_day=5000,
        tokens_per_month=100_000,
    )
    await limiter.reserve("alice", None, {}, 100, 200)
    clock.advance(3)  # the minute buckets drain 1/20 of their limit
    report = {w.name: (w.used, w.remaining) for w in await limiter.usage("alice", None, {})}
    assert report == {
        "requests_per_minute": (1, 9),  # half a request left: shown as 1 used, 9 remaining
        "tokens_per_minute": (250, 750),
        "tokens_per_day": (300, 4700),
        "tokens_per_month": (300, 99_700),
    }


async def test_a_fresh_principal_has_empty_windows(
    new_store: StoreFactory, clock: ManualClock
) -> None:
    limiter = limiter_for(new_store, clock, tokens_per_minute=1000, tokens_per_day=5000)
    report = await limiter.usage("nobody", None, {})
    assert [(w.used, w.remaining, w.reset_seconds) for w in report] == [
        (0, 1000, 0.0),
        (0, 5000, 0.0),
    ]


async def test_a_shadow_limit_at_half_the_enforced_one_counts_its_refusals_and_admits_all(
    new_store: StoreFactory, clock: ManualClock
) -> None:
    limiter = limiter_for(new_store, clock, requests_per_minute=10, tokens_per_day=10_000,
                          shadow={"requests_per_minute": 5, "tokens_per_day": 5_000})  # fmt: skip
    outcomes = []
    for _ in range(10):
        reservation = await limiter.reserve("alice", None, {}, 100, 400)
        outcomes.append(reservation.shadow_refused)
        await limiter.settle(reservation, 100, 150)  # 250 real: the day's shadow never fills
    assert outcomes == [None] * 5 + ["requests_per_minute"] * 5
    assert limiter.stats.shadow_refusals == {("default", "requests_per_minute"): 5}
    usage = {w.name: w.used for w in await limiter.usage("alice", None, {})}
    assert usage == {"requests_per_minute": 10, "tokens_per_day": 2_500}  # all ten served


async def test_shadow_token_windows_settle_like_real_ones(
    new_store: StoreFactory, clock: ManualClock
) -> None:
    limiter = limiter_for(new_store, clock, tokens_per_day=100_000,
                          shadow={"tokens_per_day": 1_000})  # fmt: skip
    refused = []
    for _ in range(8):
        reservation = await limiter.reserve("alice", None, {}, 100, 500)  # holds 600
        refused.append(reservation.shadow_refused)
        await limiter.settle(reservation, 100, 100)  # costs 200
    # the shadow day holds what admitted requests really cost: after 3 x 200 = 600 a 600-token
    # hold no longer fits, and a request it refuses is not charged in it: the shadow stays at
    # 600, as an enforced limit would have
    assert refused == [None] * 3 + ["tokens_per_day"] * 5
    assert limiter.stats.shadow_refusals == {("default", "tokens_per_day"): 5}
