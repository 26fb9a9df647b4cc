"""Redis store: state shared by every llmserve process pointing at the same Redis.

Each reserve and each settlement is one EVALSHA of a Lua script (reserve.lua, adjust.lua),
so the check and the charge are atomic across processes. Keys of one principal share a hash
tag (`{principal}`) so the scripts also work on Redis Cluster.

Failures surface as StoreUnavailable. redis-py reconnects by itself on the next call, and
after a Redis restart it reloads the scripts (NOSCRIPT), so nothing needs restarting here.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from llmserve.limits.stores.base import ReserveOutcome, StoreUnavailable
from llmserve.limits.windows import WindowCharge, refill

DEFAULT_KEY_PREFIX = "llmserve:limits:"
# A limiter must answer fast even when Redis does not: a request waits at most this long for
# a reply. Connecting gets longer: a burst opens the whole pool at once on a busy event loop.
DEFAULT_TIMEOUT_SECONDS = 0.5
DEFAULT_CONNECT_TIMEOUT_SECONDS = 2.0
# Redis runs scripts one at a time, so more connections add no throughput, only connects.
DEFAULT_MAX_CONNECTIONS = 16
# Kept a minute past the window's end so a late settlement still finds it.
_FIXED_EXPIRY_MARGIN_MS = 60_000


def _script(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


class RedisStore:
    def __init__(
        self,
        client: aioredis.Redis,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        max_in_flight: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        self.client = client
        # Calls beyond the pool queue here, first come first served. (redis-py's own
        # BlockingConnectionPool starved some waiters for seconds under a 64-wide burst.)
        self._slots = asyncio.Semaphore(max_in_flight)
        self._prefix = key_prefix
        self._reserve = client.register_script(_script("reserve.lua"))
        self._adjust = client.register_script(_script("adjust.lua"))

    @classmethod
    def from_url(cls, url: str, key_prefix: str = DEFAULT_KEY_PREFIX) -> RedisStore:
        """Options in the URL's query (`?max_connections=32`) override the defaults here."""
        pool = aioredis.ConnectionPool.from_url(
            url,
            max_connections=DEFAULT_MAX_CONNECTIONS,
            socket_timeout=DEFAULT_TIMEOUT_SECONDS,
            socket_connect_timeout=DEFAULT_CONNECT_TIMEOUT_SECONDS,
            # Retry once, at once, on a dropped connection only (a pooled connection is stale
            # after a Redis restart); never after a timeout, which may have run the script.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        return cls(aioredis.Redis(connection_pool=pool), key_prefix, pool.max_connections)

    async def reserve(
        self, principal_id: str, charges: Sequence[WindowCharge], now: float
    ) -> ReserveOutcome:
        reply = await self._call(self._reserve, principal_id, charges, now)
        return ReserveOutcome(bool(int(reply[0])), tuple(float(u) for u in reply[1:]))

    async def adjust(self, principal_id: str, charges: Sequence[WindowCharge], now: float) -> None:
        await self._call(self._adjust, principal_id, charges, now)

    async def peek(
        self, principal_id: str, charges: Sequence[WindowCharge], now: float
    ) -> tuple[float, ...]:
        pipe = self.client.pipeline(transaction=False)
        for charge in charges:
            key = self.key(principal_id, charge)
            if charge.kind == "bucket":
                pipe.hmget(key, "u", "t")
            else:
                pipe.get(key)
        try:
            async with self._slots:
                replies = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
        return tuple(_peeked(c, r, now) for c, r in zip(charges, replies, strict=True))

    async def close(self) -> None:
        await self.client.aclose()

    def key(self, principal_id: str, charge: WindowCharge) -> str:
        base = f"{self._prefix}{{{principal_id}}}:{charge.name}"
        return f"{base}:{charge.window_id}" if charge.kind == "fixed" else base

    async def _call(
        self, script: Any, principal_id: str, charges: Sequence[WindowCharge], now: float
    ) -> Any:
        keys = [self.key(principal_id, c) for c in charges]
        args: list[str | int | float] = [repr(now)]
        for c in charges:
            if c.kind == "bucket":
                args += ["b", c.limit, repr(c.rate), c.cost, 0]
            else:
                ttl_ms = math.ceil((c.window_end - now) * 1000) + _FIXED_EXPIRY_MARGIN_MS
                args += ["f", c.limit, 0, c.cost, ttl_ms]
        try:
            async with self._slots:
                return await script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc


def _peeked(charge: WindowCharge, reply: Any, now: float) -> float:
    if charge.kind == "fixed":
        return float(reply or 0)
    used, last = reply
    return refill(float(used), float(last), now, charge.rate) if used is not None else 0.0
