"""An SSE response that starts lazily and sends heartbeat comments while nothing else is sent.

The HTTP status and headers go out only with the first event or the first heartbeat, so a request
that fails early (queue full, engine error before the first token) still gets a proper JSON error
with its status code; a request that waits longer than one heartbeat interval is already a stream.

`send` never makes the engine's reader wait for a slow client: while the socket takes the data it
is written at once (no task in between, one write per event); once the client falls behind (the
socket's buffer is over its high-water mark), events queue in memory and a background task writes
them, joined, as the client reads. The engine request therefore ends, and gives its slot back,
when generation ends, however slowly the client reads; the stall guard drops a client that stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web

from llmserve.api.objects import sse_comment

log = logging.getLogger("llmserve.sse")

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
        stall_seconds: float = 60.0,
    ) -> None:
        self.request = request
        self.response = web.StreamResponse(status=200, headers={**SSE_HEADERS, **(headers or {})})
        self.heartbeat_seconds = heartbeat_seconds
        self.stall_seconds = stall_seconds
        self.comment: Callable[[], str] = lambda: "keep-alive"
        self._loop = asyncio.get_running_loop()
        self._last_write = self._loop.time()
        self._write_started: float | None = None  # set while a write waits for the socket
        self._prepare: asyncio.Future[Any] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._comment_write: asyncio.Future[None] | None = None
        self._backlog: list[bytes] = []  # events waiting for a client that fell behind
        self._drainer: asyncio.Task[None] | None = None  # writes the backlog

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
        now = self._last_write = self._loop.time()
        self._write_started = now
        try:
            if self._prepare is None or not self._prepare.done():
                await self._ensure_started()
            await self.response.write(data)
        finally:
            self._write_started = None

    async def send(self, data: bytes) -> None:
        """Write `data` now if the socket takes it, else queue it behind the earlier ones."""
        if self._drainer is not None and self._drainer.done():
            self._take_drainer().result()  # the client caught up, or is gone: then this raises
        if self._drainer is None:
            if not self._congested():
                await self.write(data)  # returns without waiting: the socket has room
                return
            self._drainer = asyncio.create_task(self._drain_backlog())
        self._backlog.append(data)

    async def drain(self) -> None:
        """Wait until every event sent has been written (raises if the client went away)."""
        if self._drainer is not None:
            await self._take_drainer()

    def _take_drainer(self) -> asyncio.Task[None]:
        # (handed over, not kept in a local: a failure raised with a reference to its task from
        # a frame of its own traceback would be a reference cycle)
        drainer, self._drainer = self._drainer, None
        assert drainer is not None
        return drainer

    def _congested(self) -> bool:
        transport = self.request.transport
        if transport is None or self._prepare is None:
            return False  # not started (the first write starts it) or gone (write raises)
        return transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]

    async def _drain_backlog(self) -> None:
        while self._backlog:
            data, self._backlog = b"".join(self._backlog), []
            await self.write(data)

    async def close(self) -> None:
        """Stop heartbeats and end the body (if the client is still there)."""
        if self._drainer is not None and not self._drainer.done():
            self._drainer.cancel()  # only on a failure: the data path drains before it closes
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, RuntimeError):
                await self._drainer
        await self.stop_heartbeats()
        if self.started:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.response.write_eof()

    async def stop_heartbeats(self) -> None:
        for task in (self._heartbeat, self._comment_write):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionError, RuntimeError):
                    await task
        self._heartbeat = self._comment_write = None

    async def _ensure_started(self) -> None:
        if self._prepare is None:
            self._prepare = asyncio.ensure_future(self.response.prepare(self.request))
        await asyncio.shield(self._prepare)

    async def _beat(self) -> None:
        """Heartbeats, and the guard against a client that stopped reading. It never waits on
        the socket itself, so a stalled client cannot stall the guard."""
        tick = min(self.heartbeat_seconds / 2, self.stall_seconds / 4, 1.0)
        while True:
            await asyncio.sleep(tick)
            now = self._loop.time()
            if self._write_started is not None:
                if now - self._write_started >= self.stall_seconds:
                    self._disconnect_stalled_client()
                    return
                continue
            if now - self._last_write >= self.heartbeat_seconds:
                self._comment_write = asyncio.ensure_future(self.write(sse_comment(self.comment())))
                self._comment_write.add_done_callback(_retrieve_exception)

    def _disconnect_stalled_client(self) -> None:
        log.warning("client accepted no data for %.0fs: disconnecting it", self.stall_seconds)
        transport = self.request.transport
        if transport is not None:
            transport.abort()  # the pending write fails; the handler ends and settles


def _retrieve_exception(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()  # a failed heartbeat write: the data path will see the same error
