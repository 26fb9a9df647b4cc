"""The Redis store against a real server: one round trip per decision, surviving a restart,
and never running a script twice when its reply is lost."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from llmserve.clock import ManualClock
from llmserve.config import LimitsConfig, TierConfig
from llmserve.errors import RateLimited, ServiceUnavailable
from llmserve.limits import Limiter, StoreUnavailable
from llmserve.limits.stores.base import Hold
from llmserve.limits.stores.redis import RedisStore
from llmserve.limits.windows import WindowRule, charge_for, make_rule
from tests.support.redis_proxy import ReplyLosingProxy
from tests.support.redis_server import RedisServer, start_or_skip

pytestmark = pytest.mark.redis
_prefixes = itertools.count()
NOW = 1_741_953_600.0


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
    return Limiter(config, store, ManualClock(1_741_953_600.0))


def untracked_hold(rule: WindowRule, cost: int) -> Hold:
    """A reservation the store keeps no record of (it has no tokens to give back)."""
    return Hold("", (charge_for(rule, cost, NOW),), NOW, NOW + 30, (rule.unit == "tokens",))


def past_retry_time(limiter: Limiter) -> None:
    """Move the limiter's clock past the moment it tries a failed store again."""
    limiter.clock.now += 1.0  # type: ignore[attr-defined]


class CommandCounter:
    """Records each round trip the client makes (`call`: one command, `call_many`: several
    in one write) as the names of the commands it carried."""

    def __init__(self, store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.round_trips: list[list[str]] = []
        client = store.client
        call, call_many = client.call, client.call_many

        async def counted_call(*args: Any) -> Any:
            self.round_trips.append([str(args[0]).upper()])
            return await call(*args)

        async def counted_call_many(commands: Any) -> Any:
            self.round_trips.append([str(command[0]).upper() for command in commands])
            return await call_many(commands)

        monkeypatch.setattr(client, "call", counted_call)
        monkeypatch.setattr(client, "call_many", counted_call_many)


async def test_reserve_and_settle_are_one_round_trip_each(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    limiter = make_limiter(
        store, requests_per_minute=100, tokens_per_minute=10_000, tokens_per_day=50_000
    )
    await limiter.release(await limiter.reserve("alice", None, {}, 10, 10))  # loads the scripts
    counter = CommandCounter(store, monkeypatch)
    reservation = await limiter.reserve("alice", None, {}, 100, 500)
    assert counter.round_trips == [["EVALSHA"]]
    await limiter.settle(reservation, 100, 20)
    assert counter.round_trips == [["EVALSHA"], ["EVALSHA"]]
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
    assert limiter.stats.settlements_pending == 1  # kept, to send once Redis is back

    redis_server.start()  # same port, empty (no persistence), same client and limiter
    past_retry_time(limiter)
    # The first call that succeeds sends the kept settlement: Redis lost the hold, so the
    # request is charged what it used (110), which leaves room for four more, not five.
    for _ in range(4):
        await limiter.reserve("alice", None, {}, 100, 100)
    with pytest.raises(RateLimited):
        await limiter.reserve("alice", None, {}, 100, 100)
    assert limiter.stats.rejected_unavailable == 20
    assert limiter.stats.settlements_pending == 0 and limiter.stats.settlements_lost == 0
    await limiter.close()


async def test_open_policy_admits_while_redis_is_down_then_enforces_again(
    redis_server: RedisServer, store: RedisStore
) -> None:
    limiter = make_limiter(store, "open", requests_per_minute=2)
    redis_server.stop()
    for _ in range(4):
        assert not (await limiter.reserve("alice", None, {}, 1, 1)).checked
    assert limiter.stats.admitted_unchecked == 4

    redis_server.start()
    past_retry_time(limiter)
    await limiter.reserve("alice", None, {}, 1, 1)
    await limiter.reserve("alice", None, {}, 1, 1)
    with pytest.raises(RateLimited):
        await limiter.reserve("alice", None, {}, 1, 1)
    assert limiter.stats.admitted_unchecked == 4


async def test_a_restart_between_calls_costs_no_error_and_reloads_the_script_in_one_write(
    redis_server: RedisServer, store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    minute = untracked_hold(make_rule("requests_per_minute", 10), 1)
    await store.reserve("alice", minute)
    redis_server.stop()
    redis_server.start()  # empty: no data, no scripts
    counter = CommandCounter(store, monkeypatch)
    assert (await store.reserve("alice", minute)).used == (0.0,)
    assert counter.round_trips == [["EVALSHA"], ["SCRIPT", "EVALSHA"]]  # NOSCRIPT, then load


@pytest.mark.parametrize(("mode", "error"), [("drop", "connection lost"), ("hold", "no reply")])
async def test_a_reserve_whose_reply_is_lost_is_never_run_again(
    redis_server: RedisServer, mode: str, error: str
) -> None:
    proxy = ReplyLosingProxy(redis_server.port)
    await proxy.start()
    store = RedisStore.from_url(f"redis://127.0.0.1:{proxy.port}/0?socket_timeout=0.2")
    minute = untracked_hold(make_rule("requests_per_minute", 10), 1)
    try:
        await store.reserve("alice", minute)
        proxy.mode = mode
        with pytest.raises(StoreUnavailable, match=error):
            await store.reserve("alice", minute)  # Redis ran it; the reply is lost
        proxy.mode = "pass"
        # twice in all, not three times
        assert await store.peek("alice", minute.charges, NOW) == (2.0,)
    finally:
        await store.close()
        await proxy.close()
