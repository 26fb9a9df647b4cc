"""The limiter's side of holds: ids and leases for reservations, and settlements that wait for
the store to come back.

- Every reservation that holds tokens gets an id. Settling it is exactly once by that id, in
  the store, whatever happens to the calls on the way (stores/base.py).
- With a shared store (Redis), a hold carries a lease of `limits.hold_lease_seconds`. This
  process renews the leases of its requests in flight every third of that, in one pipelined
  round trip; a process that dies stops renewing, and its holds' tokens are refunded once their
  leases end, so a SIGKILL never leaves worst cases charged.
- A settlement the store did not take (down, slow, breaker open) is kept, in order, and sent
  again as soon as the store answers a call, or on the next renewal tick. The backlog is
  bounded (MAX_PENDING); what falls off it, or is still in it at shutdown, is counted in
  `settlements_lost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections import deque
from typing import TYPE_CHECKING

from llmserve.limits.stores.base import Hold, StoreUnavailable
from llmserve.limits.windows import WindowCharge, WindowRule

if TYPE_CHECKING:
    from llmserve.limits.limiter import Limiter, Settlement

log = logging.getLogger("llmserve.limits")

# Hold ids: unique across processes (a random tag per process) and cheap (a counter).
_PROCESS_TAG = os.urandom(8).hex() + "-"
_serial = itertools.count(1)
MAX_PENDING = 100_000  # settlements kept while the store is down
_SHUTDOWN_FLUSH_SECONDS = 2.0  # how long close() may spend sending what is pending


class HoldKeeper:
    def __init__(self, limiter: Limiter, lease_seconds: float) -> None:
        self._limiter = limiter
        self.lease_seconds = lease_seconds
        self._live: dict[str, tuple[str, Hold]] = {}  # id -> (principal id, hold): to renew
        self._pending: deque[Settlement] = deque()
        self._ticker: asyncio.Task[None] | None = None
        self._flushing: asyncio.Task[None] | None = None

    @property
    def _leases(self) -> bool:
        return bool(getattr(self._limiter.store, "leases", False))

    def new(
        self, charges: tuple[WindowCharge, ...], rules: tuple[WindowRule, ...], now: float
    ) -> Hold:
        """A hold for these charges (one per rule); it needs an id only when it holds tokens
        to give back."""
        token_windows = tuple(rule.unit == "tokens" for rule in rules)
        holds_tokens = any(t and c.cost for t, c in zip(token_windows, charges, strict=True))
        hold_id = f"{_PROCESS_TAG}{next(_serial):x}" if holds_tokens else ""
        return Hold(hold_id, charges, now, now + self.lease_seconds, token_windows)

    def track(self, principal_id: str, hold: Hold) -> None:
        """Renew this hold's lease until it is settled."""
        if hold.id and self._leases:
            self._live[hold.id] = (principal_id, hold)
            self._tick_soon()

    def untrack(self, hold_id: str) -> None:
        self._live.pop(hold_id, None)

    def defer(self, settlement: Settlement) -> None:
        """Keep a settlement the store did not take, to send it again once it answers."""
        stats = self._limiter.stats
        if len(self._pending) >= MAX_PENDING:
            self._pending.popleft()
            stats.settlements_lost += 1
        self._pending.append(settlement)
        stats.settlements_deferred += 1
        stats.settlements_pending = len(self._pending)
        self._tick_soon()

    def store_answered(self) -> None:
        """The store took a call: send what is pending now, not at the next tick."""
        if self._pending:
            self._flush_task()

    def _flush_task(self) -> asyncio.Task[None]:
        """The one task sending pending settlements (started when none runs)."""
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self._flush())
        return self._flushing

    @property
    def live(self) -> int:
        return len(self._live)

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if self._pending:
            flushing = self._flush_task()
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(flushing, _SHUTDOWN_FLUSH_SECONDS)
        if self._pending:
            log.error("limiter: %d settlements could not be sent before shutdown",
                      len(self._pending))  # fmt: skip
            self._limiter.stats.settlements_lost += len(self._pending)
            self._pending.clear()
            self._limiter.stats.settlements_pending = 0

    def _tick_soon(self) -> None:
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        """Renew leases and retry pending settlements while there are any."""
        interval = self.lease_seconds / 3
        while self._live or self._pending:
            await asyncio.sleep(interval)
            if self._pending:
                await self._flush_task()
            if self._live and self._limiter.breaker.allows_call():
                await self._renew()

    async def _renew(self) -> None:
        limiter = self._limiter
        try:
            await limiter.store.renew(list(self._live.values()),
                                      limiter.clock() + self.lease_seconds)  # fmt: skip
        except StoreUnavailable as exc:
            limiter.store_failed("renew", exc)

    async def _flush(self) -> None:
        """Send pending settlements in order; stop at the first failure (the store is down)."""
        limiter = self._limiter
        while self._pending and limiter.breaker.allows_call():
            settlement = self._pending[0]
            try:
                await limiter.store.settle(settlement.principal_id, settlement.hold,
                                           settlement.actual, limiter.clock())  # fmt: skip
            except StoreUnavailable as exc:
                limiter.store_failed("settle", exc)
                return
            if self._pending and self._pending[0] is settlement:
                self._pending.popleft()
            limiter.stats.settlements_pending = len(self._pending)
            limiter.store_ok()
