"""Redis store: state shared by every llmserve process pointing at the same Redis.

Each reserve, settlement and usage read is one EVALSHA of a Lua script (reserve.lua,
settle.lua, peek.lua, each after common.lua), so the check and the charge are atomic across
processes. Keys of one principal share a hash tag (`{principal}`) so the scripts also work on
Redis Cluster.

Holds (stores/base.py): each reservation is recorded with a lease. A hold whose lease ran
out, because the process that made it died, gets its tokens refunded by the next usage read
(`keys usage`) or the next reserve that would otherwise be refused. The limiter renews the
leases of its live holds. A settlement is recorded for a while after it ran, so a reserve
that reaches Redis after its own settlement (a reply lost, Redis paused) charges nothing.

The client is our own (stores/resp.py): one connection, commands pipelined on it; behind a
Sentinel URL it follows the master (stores/sentinel.py), behind a Cluster URL it sends each
script to the node of its principal's slot (stores/cluster.py). Failures surface as
StoreUnavailable, and the limiter applies `limits.on_store_error`:

- Redis restarted or killed: calls in flight fail; the next call connects again, and after a
  restart the scripts are loaded again (NOSCRIPT: the script did not run, so retrying it is
  safe). Nothing here needs restarting.
- No reply within socket_timeout (0.5 s by default): the connection is dropped and every call
  in flight fails.
- A command already sent is never sent again, after a timeout or a dropped connection: the
  script may have run, and charging a request twice is worse than not knowing. The limiter
  settles such a reservation later instead (by its hold id, which makes that exactly once).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from importlib import resources
from typing import Any

from llmserve.limits.stores.base import Hold, ReserveOutcome, StoreUnavailable
from llmserve.limits.stores.persistence import persistence_warning
from llmserve.limits.stores.resp import (
    RedisClient,
    RespArg,
    RespFailure,
    RespNotSent,
    Script,
    client_from_url,
)
from llmserve.limits.windows import WindowCharge

DEFAULT_KEY_PREFIX = "llmserve:limits:"
# Kept a minute past the window's end so a late settlement still finds it.
_EXPIRY_MARGIN_MS = 60_000
# A settlement is remembered this many lease lengths (at least a minute): a reserve delayed
# longer than that finds its hold's lease over at once and is refunded anyway.
_DONE_LEASES = 2
_MIN_DONE_SECONDS = 60.0


def _script(name: str) -> Script:
    text = resources.files(__package__).joinpath
    return Script(text("common.lua").read_text("utf-8") + "\n" + text(name).read_text("utf-8"))


class RedisStore:
    leases = True  # shared by processes: a hold outlives a dead one until its lease ends

    def __init__(self, client: RedisClient, key_prefix: str = DEFAULT_KEY_PREFIX) -> None:
        self.client = client
        self._prefix = key_prefix
        self._reserve = _script("reserve.lua")
        self._settle = _script("settle.lua")
        self._peek = _script("peek.lua")

    @classmethod
    def from_url(cls, url: str, key_prefix: str = DEFAULT_KEY_PREFIX) -> RedisStore:
        """URL forms and query options: stores/urls.py (one server, Sentinel, Cluster)."""
        return cls(client_from_url(url), key_prefix)

    async def reserve(self, principal_id: str, hold: Hold) -> ReserveOutcome:
        now, charges = hold.reserved_at, hold.charges
        windows: list[RespArg] = []
        for c in charges:
            windows += [
                "b" if c.kind == "bucket" else "f", c.limit, repr(c.rate), c.cost,
                _window_ttl_ms(c, now),
            ]  # fmt: skip
        keys_ttl = max(
            [_window_ttl_ms(c, now) for c in charges]
            + [math.ceil((hold.lease_until - now) * 1000) + _EXPIRY_MARGIN_MS]
        )
        args: list[RespArg] = [
            repr(now),
            hold.id,
            repr(hold.lease_until),
            self._member(principal_id, hold),
            keys_ttl,
            *windows,
        ]
        reply = await self._eval(self._reserve, principal_id, charges, args)
        admitted = int(reply[0])
        if admitted < 0:  # cancelled before it ran: only a stale reserve nobody waits for
            return ReserveOutcome(False, tuple(0.0 for _ in charges))
        n = len(charges)
        numbers = [float(v) for v in reply[1:]]
        return ReserveOutcome(admitted == 1, tuple(numbers[:n]), tuple(numbers[n:]))

    async def settle(
        self, principal_id: str, hold: Hold, actual: Sequence[int], now: float
    ) -> None:
        lease = max(0.0, hold.lease_until - hold.reserved_at)
        done_until = now + max(_MIN_DONE_SECONDS, _DONE_LEASES * lease)
        args: list[RespArg] = [repr(now), hold.id, repr(done_until),
                               self._member(principal_id, hold) if hold.id else "",
                               repr(hold.reserved_at)]  # fmt: skip
        for c, units in zip(hold.charges, actual, strict=True):
            kind = "b" if c.kind == "bucket" else "f"
            args += [kind, repr(c.rate), c.cost, units, _window_ttl_ms(c, now)]
        await self._eval(self._settle, principal_id, hold.charges, args)

    async def renew(self, holds: Sequence[tuple[str, Hold]], until: float) -> None:
        by_principal: dict[str, list[RespArg]] = defaultdict(list)
        for principal_id, hold in holds:
            by_principal[principal_id] += [repr(until), self._member(principal_id, hold)]
        # XX: a hold already expired (and refunded) must not come back
        commands = [("ZADD", self._hold_keys(principal_id)[0], "XX", *scores)
                    for principal_id, scores in by_principal.items()]  # fmt: skip
        try:
            await self.client.call_many(commands)
        except (RespFailure, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc

    async def peek(
        self, principal_id: str, charges: Sequence[WindowCharge], now: float
    ) -> tuple[float, ...]:
        kinds: list[RespArg] = ["b" if c.kind == "bucket" else "f" for c in charges]
        rates: list[RespArg] = [repr(c.rate) for c in charges]
        reply = await self._eval(self._peek, principal_id, charges, [repr(now), *kinds, *rates])
        return tuple(float(v) for v in reply)

    async def close(self) -> None:
        await self.client.close()

    async def persistence_warning(self) -> str | None:
        """What a restart of a Redis server that keeps no copy of its data costs (day and
        month quotas reset); None when it persists or cannot be told (stores/persistence.py)."""
        return await persistence_warning(
            self.client, "limits.store", "resets every day and month quota", "docs/limits.md"
        )

    def key(self, principal_id: str, charge: WindowCharge) -> str:
        base = f"{self._prefix}{{{principal_id}}}:{charge.key}"
        return f"{base}:{charge.window_id}" if charge.kind == "fixed" else base

    def _hold_keys(self, principal_id: str) -> list[str]:
        """holds, held, done: see common.lua."""
        base = f"{self._prefix}{{{principal_id}}}:"
        return [base + "holds", base + "held", base + "settled"]

    def _member(self, principal_id: str, hold: Hold) -> str:
        """The hold as its member of the holds set: JSON with all a refund needs. Built the
        same way every time: settling and renewing name the member by its exact text."""
        windows = ",".join(
            f'{{"k":{json.dumps(self.key(principal_id, c))},"b":{int(c.kind == "bucket")},'
            f'"r":{c.rate!r},"c":{c.cost},"t":{int(tokens)}}}'
            for c, tokens in zip(hold.charges, hold.token_windows, strict=True)
        )
        return f'{{"id":"{hold.id}","at":{hold.reserved_at!r},"w":[{windows}]}}'

    async def _eval(
        self,
        script: Script,
        principal_id: str,
        charges: Sequence[WindowCharge],
        args: Sequence[RespArg],
    ) -> Any:
        keys = self._hold_keys(principal_id) + [self.key(principal_id, c) for c in charges]
        try:
            return await self.client.evalsha(script, keys, args)
        except RespNotSent as exc:
            raise StoreUnavailable(f"redis: {exc}", maybe_applied=False) from exc
        except (RespFailure, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc


def _window_ttl_ms(charge: WindowCharge, now: float) -> int:
    """How long a window's key must live: a fixed window until it ends, a bucket until a full
    one has drained; a minute more either way, for late settlements."""
    if charge.kind == "fixed":
        return math.ceil((charge.window_end - now) * 1000) + _EXPIRY_MARGIN_MS
    drain = charge.limit / charge.rate if charge.rate > 0 else 0.0
    return math.ceil(drain * 1000) + _EXPIRY_MARGIN_MS
