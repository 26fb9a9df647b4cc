"""Redis store: state shared by every llmserve process pointing at the same Redis.

Each reserve and each settlement is one EVALSHA of a Lua script (reserve.lua, adjust.lua),
so the check and the charge are atomic across processes. Keys of one principal share a hash
tag (`{principal}`) so the scripts also work on Redis Cluster.

The client is our own (stores/resp.py): one connection, commands pipelined on it. Failures
surface as StoreUnavailable, and the limiter applies `limits.on_store_error`:

- Redis restarted or killed: calls in flight fail; the next call connects again, and after a
  restart the scripts are loaded again (NOSCRIPT: the script did not run, so retrying it is
  safe). Nothing here needs restarting.
- No reply within socket_timeout (0.5 s by default): the connection is dropped and every call
  in flight fails.
- A command already sent is never sent again, after a timeout or a dropped connection: the
  script may have run, and charging a request twice is worse than not knowing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from importlib import resources
from typing import Any

from llmserve.limits.stores.base import ReserveOutcome, StoreUnavailable
from llmserve.limits.stores.resp import RespArg, RespClient, RespFailure, Script
from llmserve.limits.windows import WindowCharge, refill

DEFAULT_KEY_PREFIX = "llmserve:limits:"
# Kept a minute past the window's end so a late settlement still finds it.
_FIXED_EXPIRY_MARGIN_MS = 60_000


def _script(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


class RedisStore:
    def __init__(self, client: RespClient, key_prefix: str = DEFAULT_KEY_PREFIX) -> None:
        self.client = client
        self._prefix = key_prefix
        self._reserve = Script(_script("reserve.lua"))
        self._adjust = Script(_script("adjust.lua"))

    @classmethod
    def from_url(cls, url: str, key_prefix: str = DEFAULT_KEY_PREFIX) -> RedisStore:
        """URL forms and query options: RespClient.from_url (stores/resp.py)."""
        return cls(RespClient.from_url(url), key_prefix)

    async def reserve(
        self, principal_id: str, charges: Sequence[WindowCharge], now: float
    ) -> ReserveOutcome:
        reply = await self._run(self._reserve, principal_id, charges, now)
        return ReserveOutcome(bool(int(reply[0])), tuple(float(u) for u in reply[1:]))

    async def adjust(self, principal_id: str, charges: Sequence[WindowCharge], now: float) -> None:
        await self._run(self._adjust, principal_id, charges, now)

    async def peek(
        self, principal_id: str, charges: Sequence[WindowCharge], now: float
    ) -> tuple[float, ...]:
        commands = [_peek_command(self.key(principal_id, c), c) for c in charges]
        try:
            replies = await self.client.call_many(commands)
        except (RespFailure, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
        return tuple(_peeked(c, r, now) for c, r in zip(charges, replies, strict=True))

    async def close(self) -> None:
        await self.client.close()

    async def persistence_warning(self) -> str | None:
        """What is at risk when the Redis server keeps no copy of its data (no RDB snapshots,
        no AOF): a restart resets day and month quotas. None when it persists, or when it
        cannot be told (CONFIG is often disabled on managed Redis)."""
        try:
            save, appendonly = await self.client.call_many(
                [("CONFIG", "GET", "save"), ("CONFIG", "GET", "appendonly")]
            )
        except (RespFailure, OSError):
            return None
        if _config_value(save) or _config_value(appendonly) == "yes":
            return None
        return (
            f"limits.store: the Redis server at {self.client.options.where} has no persistence "
            "(no RDB `save`, `appendonly no`): a restart resets every day and month quota. "
            "Set `appendonly yes` (or a `save` schedule) on it; see docs/limits.md."
        )

    def key(self, principal_id: str, charge: WindowCharge) -> str:
        base = f"{self._prefix}{{{principal_id}}}:{charge.name}"
        return f"{base}:{charge.window_id}" if charge.kind == "fixed" else base

    async def _run(
        self, script: Script, principal_id: str, charges: Sequence[WindowCharge], now: float
    ) -> Any:
        keys = [self.key(principal_id, c) for c in charges]
        args: list[RespArg] = [repr(now)]
        for c in charges:
            if c.kind == "bucket":
                args += ["b", c.limit, repr(c.rate), c.cost, 0]
            else:
                ttl_ms = math.ceil((c.window_end - now) * 1000) + _FIXED_EXPIRY_MARGIN_MS
                args += ["f", c.limit, 0, c.cost, ttl_ms]
        try:
            return await self.client.evalsha(script, keys, args)
        except (RespFailure, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc


def _config_value(reply: Any) -> str:
    """The value of a CONFIG GET reply ([name, value]), as text ("" when absent)."""
    if not isinstance(reply, list) or len(reply) < 2:
        return ""
    value = reply[1]
    return value.decode() if isinstance(value, bytes) else str(value)


def _peek_command(key: str, charge: WindowCharge) -> tuple[str, ...]:
    return ("HMGET", key, "u", "t") if charge.kind == "bucket" else ("GET", key)


def _peeked(charge: WindowCharge, reply: Any, now: float) -> float:
    if charge.kind == "fixed":
        return float(reply or 0)
    used, last = reply
    return refill(float(used), float(last), now, charge.rate) if used is not None else 0.0
