"""The memory store keeps usage across a restart by persisting it under limits.state_dir."""

from __future__ import annotations

import asyncio
import calendar
from pathlib import Path

import pytest

from llmserve.config import LimitsConfig, TierConfig
from llmserve.errors import RateLimited
from llmserve.limits import Limiter, store_from_url
from llmserve.limits.stores.memory import MemoryStore

NOON = float(calendar.timegm((2025, 3, 14, 12, 0, 0)))


def config(state_dir: Path) -> LimitsConfig:
    tier = TierConfig(tokens_per_minute=1000, tokens_per_day=1500, tokens_per_month=50_000)
    return LimitsConfig(state_dir=state_dir, tiers={"default": tier})


async def test_day_and_month_usage_survive_a_restart(tmp_path: Path) -> None:
    limits = config(tmp_path)
    first = Limiter(limits, store_from_url(limits.store, limits.state_dir), lambda: NOON)
    reservation = await first.reserve("alice", None, {}, 200, 800)
    await first.settle(reservation, 200, 300)
    await first.close()

    later = NOON + 3600.0
    second = Limiter(limits, store_from_url(limits.store, limits.state_dir), lambda: later)
    usage = {w.name: w.used for w in await second.usage("alice", None, {})}
    assert usage == {"tokens_per_minute": 0, "tokens_per_day": 500, "tokens_per_month": 500}
    await second.reserve("alice", None, {}, 500, 500)  # the day is now full: 500 + 1000
    with pytest.raises(RateLimited, match="tokens per day: limit 1500, used 1500"):
        await second.reserve("alice", None, {}, 1, 0)
    await second.close()


async def test_a_crash_keeps_settled_usage_and_drops_the_holds_of_requests_in_flight(
    tmp_path: Path,
) -> None:
    limits = config(tmp_path)
    crashed = Limiter(limits, MemoryStore(tmp_path, flush_seconds=0), lambda: NOON)
    done = await crashed.reserve("alice", None, {}, 100, 100)
    await crashed.settle(done, 100, 40)
    await crashed.reserve("alice", None, {}, 100, 700)  # in flight when the process dies
    # never closed: as if killed
    survivor = Limiter(limits, MemoryStore(tmp_path), lambda: NOON)
    # The minute bucket is not persisted: it would be empty a minute later anyway. The day
    # and month hold what the finished request used, as the usage ledger does, and nothing
    # of the request that died with the process (it is not in the ledger either).
    assert [w.used for w in await survivor.usage("alice", None, {})] == [0, 140, 140]
    await survivor.close()


async def test_periodic_flush_writes_from_a_worker_thread(tmp_path: Path) -> None:
    limits = config(tmp_path)
    store = MemoryStore(tmp_path, flush_seconds=1e-9)
    limiter = Limiter(limits, store, lambda: NOON)
    await limiter.settle(await limiter.reserve("alice", None, {}, 100, 100), 100, 100)
    assert store._writing is not None  # handed to a thread: the event loop did not wait for it
    for _ in range(200):  # the settlement's write follows the reservation's, in order
        if not store._dirty and store._writing.done():
            break
        await asyncio.sleep(0.01)
    await store._writing
    reader = MemoryStore(tmp_path)
    usage = await Limiter(limits, reader, lambda: NOON).usage("alice", None, {})
    assert [w.used for w in usage] == [0, 200, 200]
    await reader.close()
    await store.close()


async def test_the_last_change_reaches_the_disk_without_further_traffic(tmp_path: Path) -> None:
    import asyncio

    limits = config(tmp_path)
    store = MemoryStore(tmp_path, flush_seconds=0.05)
    limiter = Limiter(limits, store, lambda: NOON)
    reservation = await limiter.reserve("alice", None, {}, 100, 100)  # flushed at once
    await limiter.settle(reservation, 100, 10)  # within the interval: must follow by itself
    reader_usage: list[float] = []
    async with asyncio.timeout(5):
        while reader_usage != [0, 110, 110]:
            await asyncio.sleep(0.05)
            reader = MemoryStore(tmp_path)
            usage = await Limiter(limits, reader, lambda: NOON).usage("alice", None, {})
            reader_usage = [w.used for w in usage]
            await reader.close()
    await store.close()


async def test_windows_that_are_over_are_forgotten(tmp_path: Path) -> None:
    store = MemoryStore(None)
    now = [NOON]
    limiter = Limiter(config(tmp_path), store, lambda: now[0])
    for i in range(12_000):  # 3 windows each: 36,000 live states, none of them over
        await limiter.reserve(f"old{i}", None, {}, 1, 1)
    assert len(store._state) == 36_000
    now[0] += 40 * 86400  # 40 days later every one of those windows is over
    i = 0
    while any(key[0].startswith("old") for key in store._state):
        await limiter.reserve(f"new{i}", None, {}, 1, 1)  # traffic triggers the next sweep
        i += 1
        assert i < 10_000, "no sweep happened"
    assert len(store._state) == 3 * i  # only the live principals are kept


async def test_without_a_state_dir_nothing_is_written(tmp_path: Path) -> None:
    limits = config(tmp_path / "unused")
    store = MemoryStore(None, flush_seconds=0)
    await Limiter(limits, store, lambda: NOON).reserve("alice", None, {}, 1, 1)
    await store.close()
    assert not (tmp_path / "unused").exists()
