"""Holds against a real Redis: a reservation is given back exactly once, whatever happens to
the calls on the way (a lost reply, Redis paused, a server that dies), so usage always ends
equal to what requests really used."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from llmserve.clock import ManualClock
from llmserve.config import LimitsConfig, TierConfig
from llmserve.errors import ServiceUnavailable
from llmserve.limits import Limiter
from llmserve.limits.stores.redis import RedisStore
from llmserve.limits.windows import charge_for
from tests.support.redis_proxy import ReplyLosingProxy
from tests.support.redis_server import RedisServer, start_or_skip

pytestmark = pytest.mark.redis
NOW = 1_741_953_600.0  # 2025-03-14 12:00 UTC
LEASE = 30.0
_prefixes = itertools.count()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_or_skip(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture
def prefix() -> str:
    return f"h{next(_prefixes)}:"


@pytest.fixture
async def limiters(redis_server: RedisServer, prefix: str) -> AsyncIterator[LimiterFactory]:
    made: list[Limiter] = []

    def make(policy: str = "closed", url: str | None = None,
             clock: ManualClock | None = None) -> Limiter:  # fmt: skip
        config = LimitsConfig(
            on_store_error=policy,
            hold_lease_seconds=LEASE,
            tiers={"default": TierConfig(requests_per_minute=1000, tokens_per_day=100_000)},
        )
        store = RedisStore.from_url(url or redis_server.url, key_prefix=prefix)
        limiter = Limiter(config, store, clock or ManualClock(NOW))
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        await limiter.close()


class LimiterFactory:
    def __call__(self, policy: str = ..., url: str | None = ...,
                 clock: ManualClock | None = ...) -> Limiter: ...  # fmt: skip


async def day_used(limiter: Limiter) -> int:
    windows = {w.name: w.used for w in await limiter.usage("alice", None, {})}
    return windows["tokens_per_day"]


async def test_a_dead_servers_holds_are_refunded_when_their_lease_ends(
    limiters: LimiterFactory,
) -> None:
    clock = ManualClock(NOW)
    dead = limiters(clock=clock)
    done = await dead.reserve("alice", None, {}, 100, 900)
    await dead.settle(done, 100, 50)
    for _ in range(3):
        await dead.reserve("alice", None, {}, 100, 900)  # in flight when the server dies
    # the server is killed: nothing settles, nothing renews
    survivor = limiters(clock=clock)
    assert await day_used(survivor) == 150 + 3 * 1000  # held while the lease runs
    clock.advance(LEASE + 0.001)
    assert await day_used(survivor) == 150  # what the ledger has: the finished request only


async def test_a_live_servers_holds_outlast_the_lease_while_it_renews_them(
    limiters: LimiterFactory,
) -> None:
    clock = ManualClock(NOW)
    server = limiters(clock=clock)
    long_request = await server.reserve("alice", None, {}, 100, 900)
    for _ in range(3):
        clock.advance(LEASE * 0.6)
        await server.holds._renew()  # what the renewal task does every third of the lease
    assert await day_used(limiters(clock=clock)) == 1000  # still held, 1.8 leases later
    await server.settle(long_request, 100, 300)
    assert await day_used(server) == 400


async def test_a_settlement_after_the_lease_ran_out_charges_what_the_request_used(
    limiters: LimiterFactory,
) -> None:
    """Redis was unreachable longer than the lease: the hold was refunded, so the late
    settlement charges the whole real cost instead of correcting the hold."""
    clock = ManualClock(NOW)
    server = limiters(clock=clock)
    reservation = await server.reserve("alice", None, {}, 100, 900)
    clock.advance(LEASE + 1)
    assert await day_used(server) == 0
    await server.settle(reservation, 100, 250)
    assert await day_used(server) == 350
    await server.settle(reservation, 100, 250)  # settling twice changes nothing
    assert await day_used(server) == 350


async def test_a_reserve_that_runs_after_its_cancellation_charges_nothing(
    redis_server: RedisServer, prefix: str
) -> None:
    """Redis paused with the reserve in its socket buffer: the client timed out and sent the
    cancellation; whichever runs first, the refused request costs nothing."""
    limiter_config = LimitsConfig(tiers={"default": TierConfig(tokens_per_day=100_000)})
    store = RedisStore.from_url(redis_server.url, key_prefix=prefix)
    limiter = Limiter(limiter_config, store, ManualClock(NOW))
    plan = limiter.plan(None, {})
    hold = limiter.holds.new(tuple(charge_for(r, 1000, NOW) for r in plan.rules), plan.rules, NOW)
    await store.settle("alice", hold, (0,), NOW)  # the cancellation arrives first
    outcome = await store.reserve("alice", hold)  # then the stale reserve runs
    assert not outcome.admitted
    assert await day_used(limiter) == 0
    await limiter.close()


@pytest.mark.parametrize("mode", ["drop", "hold"])
async def test_a_reservation_whose_reply_was_lost_is_refunded_once_redis_answers(
    redis_server: RedisServer, limiters: LimiterFactory, mode: str
) -> None:
    proxy = ReplyLosingProxy(redis_server.port)
    await proxy.start()
    try:
        clock = ManualClock(NOW)
        server = limiters(url=f"redis://127.0.0.1:{proxy.port}/0?socket_timeout=0.2",
                          clock=clock)  # fmt: skip
        await server.settle(await server.reserve("alice", None, {}, 100, 100), 100, 20)
        proxy.mode = mode
        with pytest.raises(ServiceUnavailable):  # Redis ran it; the client saw a 503
            await server.reserve("alice", None, {}, 100, 900)
        proxy.mode = "pass"
        clock.advance(1.0)  # past the breaker's pause
        await day_used(server)  # the first call that succeeds sends the cancellation
        await asyncio.sleep(0.05)
        assert await day_used(server) == 120
        assert server.stats.settlements_pending == 0
    finally:
        await proxy.close()


@pytest.mark.parametrize("mode", ["drop", "hold"])
async def test_open_policy_charges_a_request_admitted_unchecked_exactly_its_real_cost(
    redis_server: RedisServer, limiters: LimiterFactory, mode: str
) -> None:
    """Fail-open: the reserve's reply was lost (it may or may not have run); the request was
    served unchecked. Either way it ends charged what it used, once."""
    proxy = ReplyLosingProxy(redis_server.port)
    await proxy.start()
    try:
        clock = ManualClock(NOW)
        server = limiters("open", url=f"redis://127.0.0.1:{proxy.port}/0?socket_timeout=0.2",
                          clock=clock)  # fmt: skip
        proxy.mode = mode
        reservation = await server.reserve("alice", None, {}, 100, 900)
        assert not reservation.checked
        await server.settle(reservation, 100, 60)  # the breaker is open: kept for later
        proxy.mode = "pass"
        clock.advance(1.0)
        await day_used(server)
        await asyncio.sleep(0.05)
        assert await day_used(server) == 160
    finally:
        await proxy.close()


async def test_redis_down_for_good_while_unchecked_requests_settle_counts_nothing_twice(
    redis_server: RedisServer, limiters: LimiterFactory
) -> None:
    clock = ManualClock(NOW)
    server = limiters("open", clock=clock)
    await day_used(server)  # connected
    redis_server.stop()
    reservations = [await server.reserve("alice", None, {}, 10, 90) for _ in range(5)]
    for reservation in reservations:
        await server.settle(reservation, 10, 30)
    assert server.stats.settlements_pending == 5
    redis_server.start()  # empty: those requests ran while it was away
    clock.advance(1.0)
    await day_used(server)
    await asyncio.sleep(0.1)
    assert await day_used(server) == 5 * 40
    assert server.stats.settlements_pending == 0 and server.stats.settlements_lost == 0
