"""In-process store: a dict, with day/month usage persisted to a diskcache across restarts.

Atomic because the asyncio loop runs one coroutine at a time and no method awaits between
reading and writing. Per process: two servers with memory stores each admit a full quota.

State per (principal, window): a bucket is (used, last update), a fixed window is
(window id, used). Only fixed windows are persisted (a minute bucket is empty again a minute
after a restart), and without the part in-flight holds account for: the holds of a process
end with it, so after a crash or a SIGKILL the restarted server reads exactly the settled
usage (what the usage ledger recorded), never the worst case of requests that died.

Changed windows are written at most every `flush_seconds`, by a worker thread so the event
loop never waits for the disk (a thousand active keys take tens of ms to write), and on
close: a crash loses at most the last `flush_seconds` of day/month usage.
`flush_seconds=0` writes synchronously on every change.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import diskcache

from llmserve.limits.stores.base import Hold, ReserveOutcome
from llmserve.limits.windows import WindowCharge, fits, refill, settle_delta

log = logging.getLogger("llmserve.limits")

_Key = tuple[str, str]
_State = tuple[float, float]
_Batch = dict[_Key, tuple[_State, float]]  # key -> (state, seconds to keep it on disk)
# Kept on disk a little past the end of its window, for late settlements.
_EXPIRY_MARGIN_SECONDS = 60.0


class MemoryStore:
    # reserve and settle complete without yielding to the event loop: a caller need not shield
    # them from cancellation (nothing can interrupt them half way)
    never_suspends = True
    leases = False  # holds live in this process and end with it

    def __init__(self, state_dir: Path | None = None, flush_seconds: float = 1.0) -> None:
        self._state: dict[_Key, _State | None] = {}
        self._dirty: dict[_Key, float] = {}  # key -> seconds it must outlive on disk
        # eviction "none": usage must never be dropped to save space; expiry still cleans up.
        self._disk = (
            diskcache.Cache(str(state_dir), eviction_policy="none")
            if state_dir is not None
            else None
        )
        self._flush_seconds = flush_seconds
        self._last_flush = time.monotonic()
        self._writing: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._expires: dict[_Key, float] = {}  # limiter clock after which a state is void
        self._sweep_at = _MIN_SWEEP_SIZE
        self._holds: set[str] = set()  # ids of holds not settled yet
        self._held: dict[_Key, tuple[float, float]] = {}  # fixed windows: (window id, held)

    async def reserve(self, principal_id: str, hold: Hold) -> ReserveOutcome:
        charges, now = hold.charges, hold.reserved_at
        used = tuple(self._used(principal_id, c, now) for c in charges)
        held = tuple(self._held_in(principal_id, c) for c in charges)
        admitted = all(fits(u, c.cost, c.limit) for u, c in zip(used, charges, strict=True))
        if admitted:
            if hold.id:
                self._holds.add(hold.id)
            for u, c in zip(used, charges, strict=True):
                if hold.id:
                    self._hold(principal_id, c, c.cost, now)
                self._write(principal_id, c, u + c.cost, now)
            self._maybe_flush()
        if len(self._state) >= self._sweep_at:
            self._sweep(now)
        return ReserveOutcome(admitted, used, held)

    def _sweep(self, now: float) -> None:
        """Forget windows that are over (drained buckets, past days and months), so memory
        follows the active principals, not every principal ever seen. Amortized O(1)."""
        void = [
            key
            for key, state in self._state.items()
            if key not in self._dirty and (state is None or self._expires.get(key, now) < now)
        ]
        for key in void:
            del self._state[key]
            self._expires.pop(key, None)
        self._sweep_at = max(_MIN_SWEEP_SIZE, 2 * len(self._state))

    async def settle(
        self, principal_id: str, hold: Hold, actual: Sequence[int], now: float
    ) -> None:
        present = not hold.id or hold.id in self._holds
        self._holds.discard(hold.id)
        for charge, cost in zip(hold.charges, actual, strict=True):
            if present and hold.id:
                self._hold(principal_id, charge, -charge.cost, now)
            delta = settle_delta(charge, cost, now - hold.reserved_at) if present else cost
            if delta:
                self._add(principal_id, charge, delta, now)
        self._maybe_flush()

    async def renew(self, holds: Sequence[tuple[str, Hold]], until: float) -> None:
        return None  # holds end with this process: there is no lease to renew

    def _add(self, principal_id: str, charge: WindowCharge, delta: int, now: float) -> None:
        state = self._read(principal_id, charge)
        if charge.kind == "fixed" and state is not None and state[0] != charge.window_id:
            return  # the reserved window is over: nothing left to correct
        if state is None and delta <= 0:
            return  # nothing there (drained, or a window never charged): a refund changes nothing
        used = self._used(principal_id, charge, now)
        self._write(principal_id, charge, max(0.0, used + delta), now)

    def _hold(self, principal_id: str, charge: WindowCharge, units: int, now: float) -> None:
        """Count units in flight in a fixed window (kept out of what is persisted)."""
        if charge.kind != "fixed":
            return
        key = (principal_id, charge.key)
        window, held = self._held.get(key, (charge.window_id, 0.0))
        if window != charge.window_id:
            if units < 0:
                return  # a hold of a window that is over: nothing of it is counted any more
            held = 0.0  # a new day or month: the old window's holds are not in it
        held = max(0.0, held + units)
        if held:
            self._held[key] = (charge.window_id, held)
        else:
            self._held.pop(key, None)
        if self._state.get(key) is not None and self._disk is not None:
            self._dirty[key] = max(0.0, charge.window_end - now) + _EXPIRY_MARGIN_SECONDS

    def _held_in(self, principal_id: str, charge: WindowCharge) -> float:
        if charge.kind != "fixed":
            return 0.0
        window, held = self._held.get((principal_id, charge.key), (None, 0.0))
        return held if window == charge.window_id else 0.0

    async def peek(
        self, principal_id: str, charges: Sequence[WindowCharge], now: float
    ) -> tuple[float, ...]:
        return tuple(self._used(principal_id, c, now) for c in charges)

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._disk is None:
            return
        if self._writing is not None:
            await self._writing
        self._write_batch(self._take_dirty())
        self._disk.close()
        self._disk = None

    def _maybe_flush(self) -> None:
        if self._disk is None or not self._dirty:
            return
        if self._writing is not None and not self._writing.done():
            # one write at a time, so an older batch never lands after a newer one: try later
            if self._timer is None:
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(max(self._flush_seconds, 0.01), self._flush_later)
            return
        if self._flush_seconds <= 0:
            self._write_batch(self._take_dirty())
            return
        loop = asyncio.get_running_loop()
        due = self._flush_seconds - (time.monotonic() - self._last_flush)
        if due <= 0:
            self._writing = loop.run_in_executor(None, self._write_batch, self._take_dirty())
            self._writing.add_done_callback(_log_write_failure)
        elif self._timer is None:
            # no further traffic may come: make sure this change reaches the disk anyway
            self._timer = loop.call_later(due, self._flush_later)

    def _flush_later(self) -> None:
        self._timer = None
        self._maybe_flush()

    def _take_dirty(self) -> _Batch:
        batch = {key: (self._settled(key), keep) for key, keep in self._dirty.items()}
        self._dirty = {}
        self._last_flush = time.monotonic()
        return batch

    def _settled(self, key: _Key) -> _State:
        """A fixed window's state without what holds in flight account for: what a restarted
        process must find (those holds die with this one)."""
        state = self._state[key]
        assert state is not None  # dirty keys always have a state
        window, held = self._held.get(key, (None, 0.0))
        return (state[0], max(0.0, state[1] - held)) if window == state[0] else state

    def _write_batch(self, batch: _Batch) -> None:
        if self._disk is None or not batch:
            return
        with self._disk.transact():
            for key, (state, keep_seconds) in batch.items():
                self._disk.set(key, state, expire=keep_seconds)

    def _read(self, principal_id: str, charge: WindowCharge) -> _State | None:
        key = (principal_id, charge.key)
        if key not in self._state:
            # First sight of this window in this process: take what a previous run left.
            persisted = charge.kind == "fixed" and self._disk is not None
            self._state[key] = self._disk.get(key) if persisted else None  # type: ignore[union-attr]
        return self._state[key]

    def _used(self, principal_id: str, charge: WindowCharge, now: float) -> float:
        state = self._read(principal_id, charge)
        if state is None:
            return 0.0
        if charge.kind == "bucket":
            return refill(state[0], state[1], now, charge.rate)
        return state[1] if state[0] == charge.window_id else 0.0

    def _write(self, principal_id: str, charge: WindowCharge, used: float, now: float) -> None:
        key = (principal_id, charge.key)
        if charge.kind == "bucket":
            previous = self._state.get(key)
            last = max(now, previous[1]) if previous is not None else now
            self._state[key] = (used, last)
            self._expires[key] = last + charge.limit / charge.rate if charge.rate else last
            return
        self._state[key] = (float(charge.window_id), used)
        self._expires[key] = charge.window_end
        if self._disk is not None:
            self._dirty[key] = max(0.0, charge.window_end - now) + _EXPIRY_MARGIN_SECONDS


_MIN_SWEEP_SIZE = 10_000  # states kept before the first sweep


def _log_write_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("could not persist limiter usage: %s", future.exception())
