"""An SSE response that starts lazily and sends heartbeat comments while nothing else is sent.

The HTTP status and headers go out only with the first event or the first heartbeat, so a request
that fails early (queue full, engine error before the first token) still gets a proper JSON error
with its status code; a request that waits longer than one heartbeat interval is already a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from aiohttp import web

from llmserve.api.objects import sse_comment

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


class SSEStream:
    def __init__(
        self,
        request: web.Request,
        heartbeat_seconds: float,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.request = request
        self.response = web.StreamResponse(status=200, headers={**SSE_HEADERS, **(headers or {})})
        self.heartbeat_seconds = heartbeat_seconds
        self.comment: Callable[[], str] = lambda: "keep-alive"
        self._loop = asyncio.get_running_loop()
        self._last_write = self._loop.time()
        self._prepare: asyncio.Future[Any] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self.events_sent = 0

    @property
    def started(self) -> bool:
        return self._prepare is not None

    def set_header(self, name: str, value: str) -> None:
        if not self.started:
            self.response.headers[name] = value

    def start_heartbeats(self) -> None:
        if self._heartbeat is None:
            self._heartbeat = asyncio.create_task(self._beat())

    async def write(self, data: bytes) -> None:
        if self._prepare is None or not self._prepare.done():
            await self._ensure_started()
        self._last_write = self._loop.time()
        self.events_sent += 1
        await self.response.write(data)

    async def close(self) -> None:
        """Stop heartbeats and end the body (if the client is still there)."""
        await self.stop_heartbeats()
        if self.started:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.response.write_eof()

    async def stop_heartbeats(self) -> None:
        task, self._heartbeat = self._heartbeat, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await task

    async def _ensure_started(self) -> None:
        if self._prepare is None:
            self._prepare = asyncio.ensure_future(self.response.prepare(self.request))
        await asyncio.shield(self._prepare)

    async def _beat(self) -> None:
        while True:
            idle = self._loop.time() - self._last_write
            if idle < self.heartbeat_seconds:
                await asyncio.sleep(self.heartbeat_seconds - idle)
                continue
            await self._ensure_started()
            self._last_write = self._loop.time()
            await self.response.write(sse_comment(self.comment()))
