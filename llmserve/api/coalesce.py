"""Hand an async iterator's items to the consumer in batches: everything ready at once.

A stream's writer then sends all the deltas the engine produced while it was writing in one
socket write: one syscall per batch instead of one per token when the engine runs ahead of the
client, and no extra latency when it does not (a lone delta is handed over at once).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Coalescer(Generic[T]):
    def __init__(self, source: AsyncIterator[T]) -> None:
        self._source = source
        self._items: list[T] = []
        self._ready = asyncio.Event()
        self._finished = False
        self._error: BaseException | None = None
        self._task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        try:
            async for item in self._source:
                self._items.append(item)
                self._ready.set()
        except Exception as exc:  # handed to the consumer, in order, after the items before it
            self._error = exc
        finally:
            self._finished = True
            self._ready.set()

    async def batches(self) -> AsyncIterator[list[T]]:
        try:
            while True:
                await self._ready.wait()
                self._ready.clear()
                items, self._items = self._items, []
                if items:
                    yield items
                if self._finished and not self._items:
                    if self._error is not None:
                        raise self._take_error()  # not from a local: no reference cycle
                    return
        finally:
            await self.aclose()

    def _take_error(self) -> BaseException:
        error, self._error = self._error, None
        assert error is not None
        return error

    async def aclose(self) -> None:
        """Stop the source (closing it aborts the engine request) and wait until it has."""
        if not self._task.done():
            self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
