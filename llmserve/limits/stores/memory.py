"""In-process store: a dict, optionally persisted to a diskcache so a restart keeps usage.

Atomic because the asyncio loop runs one coroutine at a time and no method awaits between
reading and writing. Per process: two servers with memory stores each admit a full quota.

State per (principal, window): a bucket is (used, last update), a fixed window is
(window id, used). Changed entries are written to disk at most every `flush_seconds`
(0: on every change) and on close, so a crash loses at most that much usage.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import diskcache

from llmserve.limits.stores.base import ReserveOutcome
from llmserve.limits.windows import WindowCharge, bucket_drain_seconds, fits, refill

_Key = tuple[str, str]
_State = tuple[float, float]
# Kept on disk a little past the moment it stops mattering, for late settlements.
_EXPIRY_MARGIN_SECONDS = 60.0


class MemoryStore:
    def __init__(self, state_dir: Path | None = None, flush_seconds: float = 1.0) -> None:
        self._state: dict[_Key, _State | None] = {}
        self._dirty: dict[_Key, float] = {}  # key -> seconds it must outlive on disk
        self._disk = diskcache.Cache(str(state_dir)) if state_dir is not None else None
        self._flush_seconds = flush_seconds
        self._last_flush = time.monotonic()

    async def reserve(
        self, principal_id: str, charges: Sequence[WindowCharge], now: float
    ) -> ReserveOutcome:
        used = tuple(self._used(principal_id, c, now) for c in charges)
        admitted = all(fits(u, c.cost, c.limit) for u, c in zip(used, charges, strict=True))
        if admitted:
            for u, c in zip(used, charges, strict=True):
                self._write(principal_id, c, u + c.cost, now)
            self._maybe_flush()
        return ReserveOutcome(admitted, used)

    async def adjust(self, principal_id: str, charges: Sequence[WindowCharge], now: float) -> None:
        for charge in charges:
            state = self._read((principal_id, charge.name))
            if charge.kind == "fixed" and (state is None or state[0] != charge.window_id):
                continue  # the reserved window is over: nothing left to correct
            if charge.kind == "bucket" and state is None and charge.cost <= 0:
                continue  # already drained: a refund changes nothing
            used = self._used(principal_id, charge, now)
            self._write(principal_id, charge, max(0.0, used + charge.cost), now)
        self._maybe_flush()

    async def peek(
        self, principal_id: str, charges: Sequence[WindowCharge], now: float
    ) -> tuple[float, ...]:
        return tuple(self._used(principal_id, c, now) for c in charges)

    async def close(self) -> None:
        if self._disk is not None:
            self.flush()
            self._disk.close()
            self._disk = None

    def flush(self) -> None:
        """Write changed windows to disk now."""
        if self._disk is None or not self._dirty:
            return
        with self._disk.transact():
            for key, keep_seconds in self._dirty.items():
                self._disk.set(key, self._state[key], expire=keep_seconds)
        self._dirty.clear()
        self._last_flush = time.monotonic()

    def _maybe_flush(self) -> None:
        if time.monotonic() - self._last_flush >= self._flush_seconds:
            self.flush()

    def _read(self, key: _Key) -> _State | None:
        if key not in self._state:
            # First sight of this window in this process: take what a previous run left.
            self._state[key] = self._disk.get(key) if self._disk is not None else None
        return self._state[key]

    def _used(self, principal_id: str, charge: WindowCharge, now: float) -> float:
        state = self._read((principal_id, charge.name))
        if state is None:
            return 0.0
        if charge.kind == "bucket":
            return refill(state[0], state[1], now, charge.rate)
        return state[1] if state[0] == charge.window_id else 0.0

    def _write(self, principal_id: str, charge: WindowCharge, used: float, now: float) -> None:
        key = (principal_id, charge.name)
        if charge.kind == "bucket":
            previous = self._state.get(key)
            last = max(now, previous[1]) if previous is not None else now
            self._state[key] = (used, last)
            keep = bucket_drain_seconds(used, charge.rate)
        else:
            self._state[key] = (float(charge.window_id), used)
            keep = charge.window_end - now
        if self._disk is not None:
            self._dirty[key] = max(0.0, keep) + _EXPIRY_MARGIN_SECONDS
