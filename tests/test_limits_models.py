"""A tier's windows per model (`limits.tiers.<name>.models`), against every store: memory and a
real Redis. The clock is injected, so every number is exact and no test sleeps.

A request running a limited model is held in the tier's windows and in the model's by one hold:
admitted only if both fit, settled once for both. The limiter is given the model the request
runs (the gateway resolves an alias to it first: tests/test_server_model_limits.py).
"""

from __future__ import annotations

import calendar
import itertools
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import pytest

from llmserve.clock import ManualClock
from llmserve.config import LimitsConfig, TierConfig, parse_config
from llmserve.errors import ConfigError, RateLimited
from llmserve.limits import Limiter, Store, StoreUnavailable
from llmserve.limits.stores.base import Hold, ReserveOutcome
from llmserve.limits.stores.memory import MemoryStore
from llmserve.limits.stores.redis import RedisStore
from llmserve.limits.windows import WindowCharge
from tests.support.redis_server import RedisServer, command, start_or_skip
from tests.test_limits_redis import CommandCounter

NOON = float(calendar.timegm((2025, 3, 14, 12, 0, 0)))
_prefixes = itertools.count()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_or_skip(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        made: Store = MemoryStore()
    else:
        server = request.getfixturevalue("redis_server")
        made = RedisStore.from_url(server.url, key_prefix=f"models{next(_prefixes)}:")
    yield made
    await made.close()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(NOON)


def tier(**settings: Any) -> LimitsConfig:
    return LimitsConfig(tiers={"default": TierConfig(**settings)})


def used(windows: Sequence[Any]) -> dict[tuple[str, str | None], int]:
    return {(w.name, w.model): w.used for w in windows}


async def test_a_models_window_refuses_exactly_at_its_limit_and_nothing_else(
    store: Store, clock: ManualClock
) -> None:
    limiter = Limiter(tier(tokens_per_day=10_000, models={"sql": {"tokens_per_day": 100}}),
                      store, clock)  # fmt: skip
    await limiter.reserve("alice", None, {}, 60, 40, model="sql")  # exactly the 100
    with pytest.raises(RateLimited) as refused:
        await limiter.reserve("alice", None, {}, 1, 0, model="sql")
    error = refused.value
    assert error.status == 429 and error.code == "rate_limit_exceeded"
    assert (error.limit, error.limit_model) == ("tokens_per_day", "sql")
    assert "tokens per day for model sql: limit 100, used 100, requested 1" in error.message
    assert error.headers["x-ratelimit-model_per_key-remaining-tokens"] == "0"
    assert error.headers["x-ratelimit-model_per_key-limit-tokens"] == "100"
    assert error.headers["x-ratelimit-remaining-tokens"] == "9900"  # the tier's own window
    # the tier's window, other models and requests naming no model are untouched by it
    await limiter.reserve("alice", None, {}, 500, 0, model="poet")
    await limiter.reserve("alice", None, {}, 400, 0)
    await limiter.reserve("bob", None, {}, 100, 0, model="sql")  # another principal's own
    windows = await limiter.usage("alice", None, {})
    assert used(windows) == {("tokens_per_day", None): 1000, ("tokens_per_day", "sql"): 100}
    await limiter.close()


async def test_the_tiers_own_window_still_refuses_a_request_its_model_has_room_for(
    store: Store, clock: ManualClock
) -> None:
    limiter = Limiter(tier(tokens_per_day=100, models={"sql": {"tokens_per_day": 1000}}),
                      store, clock)  # fmt: skip
    await limiter.reserve("alice", None, {}, 100, 0, model="sql")
    with pytest.raises(RateLimited) as refused:
        await limiter.reserve("alice", None, {}, 1, 0, model="sql")
    assert (refused.value.limit, refused.value.limit_model) == ("tokens_per_day", None)
    assert "Rate limit reached on tokens per day: limit 100" in refused.value.message
    await limiter.close()


async def test_a_refused_request_charges_neither_window(store: Store, clock: ManualClock) -> None:
    limiter = Limiter(tier(tokens_per_day=1000, models={"sql": {"tokens_per_day": 100}}),
                      store, clock)  # fmt: skip
    await limiter.reserve("alice", None, {}, 90, 0, model="sql")
    with pytest.raises(RateLimited):
        await limiter.reserve("alice", None, {}, 50, 0, model="sql")  # the tier had room
    assert used(await limiter.usage("alice", None, {})) == {
        ("tokens_per_day", None): 90, ("tokens_per_day", "sql"): 90}  # fmt: skip
    await limiter.close()


async def test_a_models_requests_per_minute_refuses_with_its_retry_after_and_blocks_nothing(
    store: Store, clock: ManualClock
) -> None:
    limiter = Limiter(tier(requests_per_minute=100, models={"sql": {"requests_per_minute": 2}}),
                      store, clock)  # fmt: skip
    for _ in range(2):
        await limiter.reserve("alice", None, {}, 1, 1, model="sql")
    with pytest.raises(RateLimited) as refused:
        await limiter.reserve("alice", None, {}, 1, 1, model="sql")
    assert refused.value.headers["Retry-After"] == "30"  # 2 a minute drain one every 30 s
    assert refused.value.headers["x-ratelimit-model_per_key-remaining-requests"] == "0"
    assert refused.value.headers["x-ratelimit-remaining-requests"] == "98"
    limiter.refuse_early("alice", None, {})  # no early block: other models still fit
    await limiter.reserve("alice", None, {}, 1, 1, model="poet")
    clock.advance(30)
    await limiter.reserve("alice", None, {}, 1, 1, model="sql")
    await limiter.close()


async def test_both_windows_are_settled_once_by_one_hold(store: Store, clock: ManualClock) -> None:
    limiter = Limiter(tier(tokens_per_day=1000, models={"sql": {"tokens_per_day": 500}}),
                      store, clock)  # fmt: skip
    reservation = await limiter.reserve("alice", None, {}, 10, 90, model="sql")
    assert reservation.hold is not None and len(reservation.hold.charges) == 2
    assert used(await limiter.usage("alice", None, {})) == {
        ("tokens_per_day", None): 100, ("tokens_per_day", "sql"): 100}  # fmt: skip
    await limiter.settle(reservation, 10, 5)
    await limiter.settle(reservation, 10, 50)  # a second settlement changes nothing
    await limiter.release(reservation)
    assert used(await limiter.usage("alice", None, {})) == {
        ("tokens_per_day", None): 15, ("tokens_per_day", "sql"): 15}  # fmt: skip
    await limiter.close()


async def test_success_headers_carry_the_tiers_trios_and_the_models(
    store: Store, clock: ManualClock
) -> None:
    limiter = Limiter(tier(requests_per_minute=60, tokens_per_minute=6000,
                           models={"sql": {"requests_per_minute": 6, "tokens_per_day": 500}}),
                      store, clock)  # fmt: skip
    reservation = await limiter.reserve("alice", None, {}, 50, 50, model="sql")
    assert reservation.headers == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "6000",
        "x-ratelimit-remaining-tokens": "5900",
        "x-ratelimit-reset-tokens": "1s",
        "x-ratelimit-model_per_key-limit-requests": "6",
        "x-ratelimit-model_per_key-remaining-requests": "5",
        "x-ratelimit-model_per_key-reset-requests": "10s",
        "x-ratelimit-model_per_key-limit-tokens": "500",
        "x-ratelimit-model_per_key-remaining-tokens": "400",
        "x-ratelimit-model_per_key-reset-tokens": "12h0m0s",
    }
    other = await limiter.reserve("alice", None, {}, 50, 50, model="poet")
    assert not any("model_per_key" in name for name in other.headers)
    await limiter.close()


async def test_a_model_limited_only_by_its_own_windows(store: Store, clock: ManualClock) -> None:
    limiter = Limiter(tier(models={"sql": {"tokens_per_minute": 600}}), store, clock)
    free = await limiter.reserve("alice", None, {}, 10_000, 10_000, model="poet")
    assert free.hold is None and free.headers == {}  # the tier limits nothing else
    await limiter.reserve("alice", None, {}, 300, 300, model="sql")
    with pytest.raises(RateLimited) as refused:
        await limiter.reserve("alice", None, {}, 60, 0, model="sql")
    assert refused.value.headers["Retry-After"] == "6"  # 10 tokens/s drain
    await limiter.close()


async def test_a_request_bigger_than_its_models_window_never_fits(
    store: Store, clock: ManualClock
) -> None:
    limiter = Limiter(tier(models={"sql": {"tokens_per_minute": 100}}), store, clock)
    with pytest.raises(RateLimited) as refused:
        await limiter.reserve("alice", None, {}, 60, 60, model="sql")
    error = refused.value
    assert "tokens per minute limit for model sql is 100, so it can never" in error.message
    assert error.headers == {"x-should-retry": "false",
                             "x-ratelimit-model_per_key-limit-tokens": "100"}  # fmt: skip
    assert (error.limit, error.limit_model) == ("tokens_per_minute", "sql")
    await limiter.close()


async def test_a_reload_applies_new_model_windows_to_the_next_requests(
    store: Store, clock: ManualClock
) -> None:
    limiter = Limiter(tier(models={"sql": {"tokens_per_day": 100}}), store, clock)
    held = await limiter.reserve("alice", None, {}, 100, 0, model="sql")
    limiter.reconfigure(tier(models={"sql": {"tokens_per_day": 150}}))
    await limiter.reserve("alice", None, {}, 50, 0, model="sql")
    limiter.reconfigure(tier(models={"poet": {"tokens_per_day": 1}}))
    await limiter.reserve("alice", None, {}, 500, 0, model="sql")  # no longer limited
    await limiter.settle(held, 20, 0)  # settles under the plan it was made with
    windows = used(await limiter.usage("alice", None, {}))
    assert windows == {("tokens_per_day", "poet"): 0}
    limiter.reconfigure(tier(models={"sql": {"tokens_per_day": 150}}))
    assert used(await limiter.usage("alice", None, {})) == {("tokens_per_day", "sql"): 70}
    await limiter.close()


async def test_usage_lists_the_tiers_windows_then_each_models(
    store: Store, clock: ManualClock
) -> None:
    limiter = Limiter(tier(tokens_per_minute=6000, models={
        "sql": {"requests_per_minute": 6}, "poet": {"tokens_per_month": 10_000}}),
        store, clock)  # fmt: skip
    await limiter.reserve("alice", None, {}, 10, 10, model="poet")
    windows = await limiter.usage("alice", None, {})
    assert [(w.name, w.model, w.used, w.remaining) for w in windows] == [
        ("tokens_per_minute", None, 20, 5980),
        ("requests_per_minute", "sql", 0, 6),
        ("tokens_per_month", "poet", 20, 9980),
    ]
    await limiter.close()


# -- Redis: one script call, and leases ------------------------------------------------------


@pytest.mark.redis
async def test_on_redis_both_windows_take_one_script_call_under_the_principals_hash_tag(
    redis_server: RedisServer, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = f"models{next(_prefixes)}:"
    store = RedisStore.from_url(redis_server.url, key_prefix=prefix)
    limiter = Limiter(tier(tokens_per_day=1000, models={"sql": {"tokens_per_day": 500}}),
                      store, clock)  # fmt: skip
    await limiter.release(await limiter.reserve("alice", None, {}, 1, 1))  # loads the scripts
    counter = CommandCounter(store, monkeypatch)
    reservation = await limiter.reserve("alice", None, {}, 10, 90, model="sql")
    await limiter.settle(reservation, 10, 5)
    assert counter.round_trips == [["EVALSHA"], ["EVALSHA"]]
    keys = {k.decode() for k in command(redis_server.port, "KEYS", prefix + "*")}
    day = int(NOON // 86_400)
    assert {f"{prefix}{{alice}}:tokens_per_day:{day}",
            f"{prefix}{{alice}}:tokens_per_day@sql:{day}"} <= keys  # fmt: skip
    await limiter.close()


@pytest.mark.redis
async def test_on_redis_a_dead_servers_hold_is_refunded_in_both_windows_after_its_lease(
    redis_server: RedisServer, clock: ManualClock
) -> None:
    prefix = f"models{next(_prefixes)}:"
    config = tier(tokens_per_day=1000, models={"sql": {"tokens_per_day": 500}})
    dead = Limiter(config, RedisStore.from_url(redis_server.url, key_prefix=prefix), clock)
    await dead.reserve("alice", None, {}, 10, 90, model="sql")  # never settled, never renewed
    clock.advance(config.hold_lease_seconds + 1)
    alive = Limiter(config, RedisStore.from_url(redis_server.url, key_prefix=prefix), clock)
    assert used(await alive.usage("alice", None, {})) == {
        ("tokens_per_day", None): 0, ("tokens_per_day", "sql"): 0}  # fmt: skip
    await alive.close()
    await dead.close()  # its holds were never settled: closing does not settle them


# -- settlement deferred while the store is down ---------------------------------------------


class DownStore:
    """A memory store whose settle fails while `down`."""

    leases = False

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.down = False

    async def reserve(self, principal_id: str, hold: Hold) -> ReserveOutcome:
        return await self.inner.reserve(principal_id, hold)

    async def settle(self, principal_id: str, hold: Hold, actual: Sequence[int],
                     now: float) -> None:  # fmt: skip
        if self.down:
            raise StoreUnavailable("connection refused")
        await self.inner.settle(principal_id, hold, actual, now)

    async def renew(self, holds: Sequence[tuple[str, Hold]], until: float) -> None:
        return None

    async def peek(self, principal_id: str, charges: Sequence[WindowCharge],
                   now: float) -> tuple[float, ...]:  # fmt: skip
        return await self.inner.peek(principal_id, charges, now)

    async def close(self) -> None:
        await self.inner.close()


async def test_a_deferred_settlement_settles_the_models_window_once_the_store_is_back(
    clock: ManualClock,
) -> None:
    store = DownStore()
    limiter = Limiter(tier(tokens_per_day=1000, models={"sql": {"tokens_per_day": 500}}),
                      store, clock, store_retry_seconds=0.5)  # fmt: skip
    reservation = await limiter.reserve("alice", None, {}, 10, 90, model="sql")
    store.down = True
    await limiter.settle(reservation, 10, 5)
    assert limiter.stats.settlements_pending == 1
    store.down = False
    clock.advance(1.0)
    await limiter.settle(reservation, 10, 5)  # already claimed: nothing more
    await limiter.usage("alice", None, {})  # the store answers: what is pending is sent
    await limiter.holds.close()  # waits for that
    assert limiter.stats.settlements_pending == 0
    assert used(await limiter.usage("alice", None, {})) == {
        ("tokens_per_day", None): 15, ("tokens_per_day", "sql"): 15}  # fmt: skip
    await limiter.close()


# -- configuration --------------------------------------------------------------------------

WITH_LORA = "engine: {kind: fake, served_model_name: base, lora: {adapters: {sql: ./a/sql}},"
WITH_LORA += " aliases: {gpt-sql: sql}}\n"
WITHOUT_LORA = "engine: {kind: fake, served_model_name: base, aliases: {gpt: base}}\n"


def config_with(models: str, engine: str = WITH_LORA) -> Any:
    text = engine + "limits: {tiers: {default: {}, pro: {models: " + models + "}}}\n"
    return parse_config(text, "x.yaml")


def test_per_model_windows_may_name_the_base_model_and_its_adapters() -> None:
    with pytest.raises(ConfigError) as typo:
        config_with("{base: {tokens_per_minute: 10}, sql: {requests_per_day: 1}}")
    assert "x.yaml: limits.tiers.pro.models.sql: unknown setting 'requests_per_day' (did you " \
           "mean 'requests_per_minute'?)" in str(typo.value)  # fmt: skip
    fine = config_with("{base: {tokens_per_minute: 10}, sql: {requests_per_minute: 1}}")
    assert fine.limits.tiers["pro"].models["sql"].requests_per_minute == 1


@pytest.mark.parametrize(
    ("models", "engine", "message"),
    [
        ("{nope: {tokens_per_minute: 10}}", WITHOUT_LORA,
         "x.yaml: limits.tiers.pro.models.nope: not a model this server serves (it serves "
         "base)"),
        ("{gpt-sql: {tokens_per_minute: 10}}", WITH_LORA,
         "x.yaml: limits.tiers.pro.models.gpt-sql: an alias of 'sql', and an alias counts as "
         "the model it stands for: set these limits on 'sql'"),
        ("{gpt: {tokens_per_minute: 10}}", WITHOUT_LORA,
         "x.yaml: limits.tiers.pro.models.gpt: an alias of 'base', and an alias counts as the "
         "model it stands for: set these limits on 'base'"),
        ("{sql: {tokens_per_minute: 0}}", WITH_LORA,
         "x.yaml: limits.tiers.pro.models.sql.tokens_per_minute: expected greater than or equal "
         "to 1 (got 0)"),
    ],
)  # fmt: skip
def test_a_per_model_window_for_a_model_that_cannot_be_served_is_a_config_error(
    models: str, engine: str, message: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        config_with(models, engine)
    assert str(refused.value) == message


def test_with_lora_on_an_unknown_name_is_a_warning_for_an_adapter_loaded_at_run_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING", logger="llmserve.config"):
        config = config_with("{poet: {tokens_per_minute: 10}}")
    assert config.limits.tiers["pro"].models["poet"].tokens_per_minute == 10
    assert caplog.messages == [
        "limits.tiers.pro.models.poet: not a model of the config (base, sql); its windows "
        "apply once an adapter of that name is loaded at run time"]  # fmt: skip
