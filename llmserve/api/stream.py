"""The lifecycle of one streamed response, for both paths (the fast path's engine deltas and the
events of the engine's own frontend). `StreamLifecycle.run` owns it; the path only supplies the
body that produces events.

States::

    OPEN ──first event or heartbeat──> STARTED ──body returns──> DRAINED ──> CLOSED
      │                                   │
      │ error before a byte               │ error after the first byte
      v                                   v
    a JSON error with its HTTP status   one `data: {"error": ...}` event, then CLOSED

Rules (each proven by the test named after it):

1. Nothing is sent before the first event or heartbeat, so an error until then (a 429, a full
   queue, a bad grammar) is a real HTTP status and a JSON body.
   -> tests/test_api_delegated.py::test_a_refused_stream_gets_a_real_http_status
2. While a request waits for an engine slot, heartbeats (`: queued position=N eta_ms=...`) keep
   proxies and clients from timing out; they start the response (rule 1 ends there).
   -> tests/test_api_admission.py::test_a_waiting_stream_hears_its_queue_position
3. The engine slot is given back when the engine is done, not when the client has read
   everything: a slow reader gets a queue and a writer task, never the slot.
   -> tests/test_stream_stalled_reader.py
4. The engine request stops (its iterator is closed) before the slot is given back and before
   the reservation is settled. -> tests/test_stream_close_order.py
5. An error event goes after every event queued before it (they were generated and charged).
   -> tests/test_stream_error_after_queued_events.py
6. A client that goes away cancels the request's task: the cancellation propagates (the engine
   request is aborted by closing its iterator); only the server's forced stop after the
   shutdown grace may un-cancel the task, to write a `shutting_down` error event.
   -> tests/test_shutdown_forced_stop.py, tests/test_api_streaming.py
7. Settlement (limits) runs to its end even if the task is cancelled meanwhile: it is shielded
   (Gateway.settle, the gate's pass). -> tests/test_limits_reserve_cancel.py
8. An unexpected exception after the first byte is an `internal_error` event, never a silent
   truncation. -> tests/test_stream_unexpected_error.py
9. No exception is kept in a local or an attribute past its handler (a traceback holding its
   own frame is a reference cycle, left for the garbage collector).
   -> tests/test_gc_garbage.py
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from llmserve.api import objects
from llmserve.api.sse import Heartbeats, SSEStream
from llmserve.errors import APIError, InternalError, shutting_down
from llmserve.request_state import RECORD

log = logging.getLogger("llmserve.gateway")

StreamBody = Callable[[SSEStream], Awaitable[None]]


class StreamLifecycle:
    def __init__(
        self,
        request: web.Request,
        heartbeats: Heartbeats,
        headers: dict[str, str],
        force_stopping: Callable[[], bool],
    ) -> None:
        self._request = request
        self._force_stopping = force_stopping
        self.sse = SSEStream(request, heartbeats, headers)

    async def run(self, body: StreamBody) -> web.StreamResponse:
        """Run `body` (which sends the events, [DONE] included) under the rules above."""
        sse = self.sse
        sse.start_heartbeats()
        try:
            await body(sse)
        # (errors are raised straight, never from a local: rule 9)
        except asyncio.CancelledError:
            await sse.stop_heartbeats()
            if not self._force_stopping():
                raise  # the client went away: nothing to tell anyone
            _uncancel()
            await self.write_error(shutting_down(cut_short=True))
        except APIError as exc:
            await sse.stop_heartbeats()
            if not sse.started:
                raise  # nothing sent yet: a plain JSON error with its HTTP status
            await self.write_error(exc)
        except ConnectionError:
            self._request[RECORD].disconnected = True
        except Exception as exc:  # a bug or an unwrapped engine error: never a silent truncation
            log.error("stream failed: %s", exc, exc_info=exc)
            await sse.stop_heartbeats()
            if not sse.started:
                raise internal_error() from None
            await self.write_error(internal_error())
        finally:
            await sse.close()
        return sse.response

    async def write_error(self, error: APIError) -> None:
        """The error event, after every event queued before it (rule 5)."""
        self._request[RECORD].error_code = error.code
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.sse.send(objects.sse_event(error.body()))
            await self.sse.drain()


def _uncancel() -> None:
    """Let a task that was cancelled to end it (shutdown) still write its answer."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


def internal_error() -> APIError:
    return InternalError(
        "The server had an error while processing your request. Retry, and if it persists, "
        "report the X-Request-Id of this response."
    )
