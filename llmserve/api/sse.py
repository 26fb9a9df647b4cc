"""An SSE response that starts lazily and sends heartbeat comments while nothing else is sent.

The HTTP status and headers go out only with the first event or the first heartbeat, so a request
that fails early (queue full, engine error before the first token) still gets a proper JSON error
with its status code; a request that waits longer than one heartbeat interval is already a stream.

`send` never makes the engine's reader wait for a slow client: while the socket takes the data, an
event is written at once (no task in between). Once the client falls behind (the socket's buffer
is over its high-water mark), events queue in memory and a background task writes them, joined, as
the client reads; the same happens to the events an engine produces faster than the event loop
turns (all but the first of one turn go out together, one write instead of one each). The engine
request therefore ends, and gives its slot back, when generation ends, however slowly the client
reads; the stall guard drops a client that stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

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
        heartbeats: Heartbeats,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.request = request
        self._heartbeats = heartbeats
        self.response = web.StreamResponse(status=200, headers={**SSE_HEADERS, **(headers or {})})
        self.comment: Callable[[], str] = lambda: "keep-alive"
        self._loop = asyncio.get_running_loop()
        self._last_write = self._loop.time()
        self._write_started: float | None = None  # set while a write waits for the socket
        self._prepare: asyncio.Future[None] | None = None  # done once the headers are out
        self._comment_write: asyncio.Future[None] | None = None
        self._backlog: list[bytes] = []  # events waiting for a client that fell behind
        self._drainer: asyncio.Task[None] | None = None  # writes the backlog
        self._sent_this_turn = False  # an event was written in this turn of the event loop

    @property
    def started(self) -> bool:
        return self._prepare is not None

    def set_header(self, name: str, value: str) -> None:
        if not self.started:
            self.response.headers[name] = value

    def start_heartbeats(self) -> None:
        self._heartbeats.add(self)

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
        """Write `data` now if the socket takes it and nothing is queued; else queue it."""
        if self._drainer is not None and self._drainer.done():
            self._take_drainer().result()  # the queue was written, or the client is gone: raises
        if self._drainer is None:
            if not self._sent_this_turn and not self._congested():
                self._sent_this_turn = True
                self._loop.call_soon(self._next_turn)
                await self.write(data)  # returns without waiting: the socket has room
                return
            # a second event within one loop turn (an engine far ahead of the loop: join them
            # into one write), or a client that fell behind: a writer task takes the queue
            self._drainer = asyncio.create_task(self._drain_backlog())
        self._backlog.append(data)

    def _next_turn(self) -> None:
        self._sent_this_turn = False

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
        if self._drainer is not None:  # only after a failure: the data path drains first
            if not self._drainer.done():
                self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, RuntimeError):
                await self._take_drainer()  # (also retrieves the error of a failed one)
        await self.stop_heartbeats()
        if self.started:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.response.write_eof()

    async def stop_heartbeats(self) -> None:
        self._heartbeats.discard(self)
        task, self._comment_write = self._comment_write, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, RuntimeError):
                await task

    async def _ensure_started(self) -> None:
        """Send the status and headers (with the first data); a second caller (a heartbeat
        racing the first event) waits for the first."""
        if self._prepare is not None:
            await asyncio.shield(self._prepare)  # a waiter cancelled must not cancel it
            return
        self._prepare = self._loop.create_future()
        try:
            await self.response.prepare(self.request)
        finally:
            self._prepare.set_result(None)  # a failed prepare fails the write that follows

    def beat(self, now: float) -> None:
        """Called by Heartbeats every tick: drop a stalled client, or send a heartbeat. Never
        waits on the socket, so a stalled client cannot stall the guard."""
        heartbeats = self._heartbeats
        if self._write_started is not None:
            if now - self._write_started >= heartbeats.stall_seconds:
                heartbeats.discard(self)
                self._disconnect_stalled_client()
            return
        if now - self._last_write >= heartbeats.heartbeat_seconds:
            self._comment_write = asyncio.ensure_future(self.write(sse_comment(self.comment())))
            self._comment_write.add_done_callback(_retrieve_exception)

    def _disconnect_stalled_client(self) -> None:
        log.warning("client accepted no data for %.0fs: disconnecting it",
                    self._heartbeats.stall_seconds)  # fmt: skip
        transport = self.request.transport
        if transport is not None:
            transport.abort()  # the pending write fails; the handler ends and settles


class Heartbeats:
    """One task ticks for the heartbeats and stall guards of every open stream: a task of each
    stream's own would cost more than a short stream's other work."""

    def __init__(self, heartbeat_seconds: float, stall_seconds: float) -> None:
        self.heartbeat_seconds = heartbeat_seconds
        self.stall_seconds = stall_seconds
        self.tick = min(heartbeat_seconds / 2, stall_seconds / 4, 1.0)
        self._streams: set[SSEStream] = set()
        self._task: asyncio.Task[None] | None = None

    def add(self, stream: SSEStream) -> None:
        self._streams.add(stream)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="sse-heartbeats")

    def discard(self, stream: SSEStream) -> None:
        self._streams.discard(stream)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._streams:  # ends when the last stream has; `add` starts it again
                await asyncio.sleep(self.tick)
                now = loop.time()
                for stream in list(self._streams):
                    stream.beat(now)
        finally:
            self._task = None


def _retrieve_exception(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()  # a failed heartbeat write: the data path will see the same error
