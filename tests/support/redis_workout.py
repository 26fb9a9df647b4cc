"""Every operation the limiter store and the key store send to Redis, with the numbers they
must give: run through a URL (TLS, an ACL user, Sentinel, Cluster) to prove that the whole
store works there, not only PING.

    await limiter_workout(url, admin=lambda: ...)   # admin: flushes the scripts (NOSCRIPT path)
    await key_store_workout(url)
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable

import pytest

from llmserve.auth.keys import JwtRevocation
from llmserve.auth.store import key_store_from_url
from llmserve.clock import ManualClock
from llmserve.config import LimitsConfig, TierConfig
from llmserve.errors import RateLimited
from llmserve.limits import Limiter, store_from_url

NOW = 1_741_953_600.0  # 2025-03-14 12:00 UTC
LEASE = 30.0
_prefixes = itertools.count()


def with_prefix(url: str, prefix: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}key_prefix={prefix}"


async def limiter_workout(
    url: str,
    principal: str = "alice",
    flush_scripts: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Reserve, refuse, settle (held, expired, twice), renew, expire and refund, peek; with
    `flush_scripts`, also a reserve after Redis lost its scripts (SCRIPT LOAD)."""
    clock = ManualClock(NOW)
    config = LimitsConfig(
        hold_lease_seconds=LEASE,
        tiers={"default": TierConfig(requests_per_minute=100, tokens_per_day=3000)},
    )
    store = store_from_url(with_prefix(url, f"llmserve:w{next(_prefixes)}:"))
    limiter = Limiter(config, store, clock)

    async def day_used() -> int:
        windows = {w.name: w.used for w in await limiter.usage(principal, None, {})}
        return int(windows["tokens_per_day"])

    try:
        first = await limiter.reserve(principal, None, {}, 100, 900)
        await limiter.settle(first, 100, 50)
        assert await day_used() == 150
        second = await limiter.reserve(principal, None, {}, 100, 900)
        await limiter.reserve(principal, None, {}, 100, 900)
        with pytest.raises(RateLimited):  # 2150 used, 1000 more would pass 3000
            await limiter.reserve(principal, None, {}, 100, 900)
        clock.advance(LEASE * 0.6)
        await limiter.holds._renew()  # ZADD XX: both holds live on
        clock.advance(LEASE * 0.6)
        assert await day_used() == 2150
        for hold_id in list(limiter.holds._live):  # as if their server had died: no renewal
            limiter.holds.untrack(hold_id)
        clock.advance(LEASE + 1)
        # the two holds' leases ran out: refunded by the reserve that would not fit otherwise
        if flush_scripts is not None:
            await flush_scripts()
        third = await limiter.reserve(principal, None, {}, 100, 900)
        assert await day_used() == 1150
        await limiter.settle(second, 100, 10)  # its hold was refunded: charged what it used
        await limiter.settle(second, 100, 10)  # once
        await limiter.settle(third, 100, 0)
        assert await day_used() == 150 + 110 + 100
    finally:
        await limiter.close()


async def key_store_workout(url: str) -> None:
    """Create, look up, touch, rotate, revoke, import, list; JWT revocations."""
    store = key_store_from_url(with_prefix(url, f"llmserve:k{next(_prefixes)}:"))
    try:
        record, api_key = await store.create("workout", tier="pro")
        found = await store.lookup(api_key)
        assert found is not None and found.id == record.id
        assert await store.lookup(api_key[:-2] + "xx") is None
        await store.touch({record.id: NOW})
        assert (await store.get(record.id)).last_used == NOW
        rotated, new_key = await store.rotate(record.id)
        assert await store.lookup(api_key) is None and await store.lookup(new_key) is not None
        assert (await store.revoke(record.id)).revoked is not None
        looked_up = await store.lookup(new_key)
        assert looked_up is not None and looked_up.revoked is not None
        count = await store.put_records([rotated], replace=True)
        assert (count.added, count.replaced) == (0, 1)
        assert [r.id for r in await store.list_keys()] == [record.id]
        revocation = JwtRevocation("sub", "bob", NOW, 4_000_000_000.0)
        assert await store.revoke_jwt(revocation) == revocation
        assert await store.jwt_revocations("bob", None) == [revocation]
        assert await store.list_jwt_revocations() == [revocation]
    finally:
        await store.close()
