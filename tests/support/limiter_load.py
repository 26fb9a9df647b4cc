"""Load through a real Limiter while its Redis fails over (Sentinel, Cluster), and the checks
that limits apply exactly afterwards.

    limiter = failover_limiter(url, "closed")
    load = Load(limiter, "alice")
    await load.run(until=time.monotonic() + 20, stop_after_streak=50)
    load.refused, load.unchecked, load.slowest    # what the policy did, the longest request
    await settled(limiter); await assert_enforced_exactly(limiter, "alice", load.used)
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import pytest

from llmserve.config import LimitsConfig, TierConfig
from llmserve.errors import RateLimited, ServiceUnavailable
from llmserve.limits import Limiter, store_from_url

DAY_LIMIT = 1_000_000
PROMPT, MAX_TOKENS, COMPLETION = 10, 10, 5  # each request holds 20 tokens and uses 15


def failover_limiter(url: str, policy: str) -> Limiter:
    tier = TierConfig(requests_per_minute=10**6, tokens_per_day=DAY_LIMIT)
    config = LimitsConfig(on_store_error=policy, tiers={"default": tier})
    return Limiter(config, store_from_url(url))  # the real clock: the breaker's second passes


@dataclass
class Load:
    """Requests from several tasks at once, each reserve followed by its settle."""

    limiter: Limiter
    principal: str = "alice"
    admitted: int = 0  # checked by the store
    unchecked: int = 0  # admitted while the store was down (open policy)
    refused: int = 0  # 503 limiter_unavailable (closed policy)
    errors: list[Exception] = field(default_factory=list)  # anything else: a bug
    streak: int = 0  # checked admissions in a row
    slowest: float = 0.0  # seconds, the longest request (reserve and settle)
    stopped: bool = False

    async def one(self) -> None:
        started = time.monotonic()
        try:
            await self._one()
        finally:
            self.slowest = max(self.slowest, time.monotonic() - started)

    async def _one(self) -> None:
        try:
            reservation = await self.limiter.reserve(self.principal, None, {}, PROMPT, MAX_TOKENS)
        except ServiceUnavailable as exc:
            assert exc.code == "limiter_unavailable"
            self.refused += 1
            self.streak = 0
            return
        except Exception as exc:
            self.errors.append(exc)
            return
        if reservation.checked:
            self.admitted += 1
            self.streak += 1
        else:
            self.unchecked += 1
            self.streak = 0
        await self.limiter.settle(reservation, PROMPT, COMPLETION)

    async def run(self, until: float, tasks: int = 8, stop_after_streak: int | None = None) -> None:
        async def worker() -> None:
            while time.monotonic() < until and not self.errors and not self.stopped:
                if stop_after_streak is not None and self.streak >= stop_after_streak:
                    return
                await self.one()
                await asyncio.sleep(0.005)

        await asyncio.gather(*(worker() for _ in range(tasks)))

    @property
    def used(self) -> int:
        """Tokens that the admitted requests used: what the day window must hold."""
        return (self.admitted + self.unchecked) * (PROMPT + COMPLETION)


async def day_used(limiter: Limiter, principal: str = "alice") -> int:
    windows = {w.name: w.used for w in await limiter.usage(principal, None, {})}
    return int(windows["tokens_per_day"])


async def settled(limiter: Limiter) -> None:
    """Wait until the settlements kept during the outage have been sent."""
    deadline = time.monotonic() + 5
    while limiter.stats.settlements_pending:
        assert time.monotonic() < deadline, "kept settlements were not sent"
        await asyncio.sleep(0.05)


async def assert_enforced_exactly(limiter: Limiter, used: int, principal: str = "alice") -> None:
    """The day window holds `used`, and refuses one token more than what is left."""
    assert await day_used(limiter, principal) == used
    left = DAY_LIMIT - used
    with pytest.raises(RateLimited):
        await limiter.reserve(principal, None, {}, left - MAX_TOKENS + 1, MAX_TOKENS)
    last = await limiter.reserve(principal, None, {}, left - MAX_TOKENS, MAX_TOKENS)
    await limiter.settle(last, left - MAX_TOKENS, MAX_TOKENS)
    assert await day_used(limiter, principal) == DAY_LIMIT
