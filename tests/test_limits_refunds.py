"""Bucket refunds: a late refund never credits tokens charged after it."""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_or_skip(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def new_store(request: pytest.FixtureRequest) -> AsyncIterator[Callable[[], Store]]:
    made: list[Store] = []
    prefix = f"review2-{next(_prefixes)}:"

    def make() -> Store:
        if request.param == "memory":
            store: Store = MemoryStore()
        else:
            store = RedisStore.from_url(request.getfixturevalue("redis_server").url, prefix)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


def limiter(store: Store, clock: ManualClock, **tier: Any) -> Limiter:
    return Limiter(LimitsConfig(tiers={"default": TierConfig(**tier)}), store, clock)


async def test_late_refund_of_a_bucket_never_credits_tokens_admitted_after_it(
    new_store: Callable[[], Store],
) -> None:
    """A reserved at t=0 for 1000 (limit 1000/min), half of it has drained by t=30. B takes the
    other half at t=30. A then settles with 1 real token: the refund of 999 also wipes B's
    charge, and C is admitted for 999 more, all at t=30: 1499 real tokens at one instant
    against a bucket whose burst is 1000."""
    clock = ManualClock(NOON)
    lim = limiter(new_store(), clock, tokens_per_minute=1000)
    a = await lim.reserve("p", None, {}, 1, 999)  # holds 1000
    clock.advance(30)  # 500 drained
    b = await lim.reserve("p", None, {}, 500, 0)  # real 500: bucket full again
    await lim.settle(b, 500, 0)
    await lim.settle(a, 1, 0)  # A really used 1 token (at t=0: long drained by now)
    # As if A had been charged 1 at t=0 the bucket now holds B's 500 only: 999 more is refused.
    with pytest.raises(RateLimited):
        await lim.reserve("p", None, {}, 999, 0)
