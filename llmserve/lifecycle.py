"""In-flight requests and draining: what graceful shutdown waits for and, at the end, cancels."""

from __future__ import annotations

import asyncio
import time


class Lifecycle:
    def __init__(self) -> None:
        self.started_at = time.time()
        self.draining = False
        self._inflight: set[asyncio.Task[object]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def enter(self, task: asyncio.Task[object]) -> None:
        self._inflight.add(task)
        self._idle.clear()

    def leave(self, task: asyncio.Task[object]) -> None:
        self._inflight.discard(task)
        if not self._inflight:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if the timeout ran out first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def cancel_all(self) -> int:
        tasks = list(self._inflight)
        for task in tasks:
            task.cancel()
        return len(tasks)
