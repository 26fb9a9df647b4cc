"""aiohttp's HTTP server, with two changes aiohttp has no setting for:

- A request it cannot parse (a NUL or a bare CR in a header, a header over the limit) gets a
  fixed JSON answer. aiohttp's own 400 quotes the offending bytes, and those may hold an API
  key: no response may ever contain a credential.
- A request's line and headers must arrive within `server.header_read_timeout_seconds`, timed
  from the connection's opening for its first request and from the first byte of each later
  one; a connection that sends part of a request and then nothing, or a byte now and then, is
  closed then (aiohttp's keepalive timeout only closes a connection that sent nothing of a
  request, after an hour). The request body has its own timeout (api/body.py).

`AppRunner` below makes its server build request handlers of this module's class. Both changes
use aiohttp 3.x internals (its RequestHandler's parser and message queue), covered by
tests/test_server_http_errors.py and tests/test_server_slow_headers.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

log = logging.getLogger("llmserve.server")

_UNPARSABLE = json.dumps({
    "error": {
        "message": "The request is not valid HTTP (a malformed or oversized header line); "
                   "nothing of it was processed.",
        "type": "invalid_request_error", "param": None, "code": "bad_http_request",
    }
})  # fmt: skip


def head_timeout_response(seconds: float) -> bytes:
    """The whole 408 sent to a client whose request headers did not arrive in time."""
    body = json.dumps({
        "error": {
            "message": f"The request's headers did not arrive within {seconds:g} s; "
                       "the connection is closed.",
            "type": "invalid_request_error", "param": None, "code": "request_timeout",
        }
    }).encode()  # fmt: skip
    head = (
        "HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class QuietRequestHandler(RequestHandler):
    """aiohttp's protocol object for one connection, with the two changes above.

    The header deadline: a timer (one `call_at` per connection, moved by resetting
    `_head_deadline`, as aiohttp moves its keepalive timer) is set when the connection opens,
    when the first bytes of a later request arrive, and after every request that has all its
    bytes, since the next one's first bytes may have come with them (pipelining). It is
    cleared while a body arrives (the body timeout's business). When it fires on a connection
    waiting for a request, the parser is asked whether it holds part of one
    (`holds_partial_request`): if so, or if the connection's first request never came, the
    connection is closed. Bytes that arrive after a whole request restart the deadline as a
    new head's first bytes; a head that in fact began in the same packet as the end of the
    request before it may so get up to twice the limit, no more.
    """

    __slots__ = ("_head_deadline", "_head_timeout", "_head_timer", "_head_unsure", "_newest")

    def __init__(
        self, manager: web.Server, *, header_read_timeout: float | None = None, **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout = header_read_timeout
        self._head_deadline: float | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_unsure = False  # set after a whole request: the next one may have begun
        self._newest: StreamReader | None = None  # the body of the newest request parsed

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status == 500:
            return super().handle_error(request, status, exc, message)
        self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        response = web.Response(status=status, text=_UNPARSABLE, content_type="application/json")
        response.force_close()
        return response

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._set_head_deadline(unsure=False)  # the first request: from the opening

    def data_received(self, data: bytes) -> None:
        if self._head_timeout is None or self._upgraded or self._payload_parser is not None:
            super().data_received(data)
            return
        had_all = self._has_all_bytes()
        count = self._request_count
        super().data_received(data)
        if self._request_count != count and self._messages:
            self._newest = self._messages[-1][1]
        if not self._has_all_bytes():
            self._head_deadline = None  # a body is arriving: body_read_timeout_seconds
        elif self._request_count != count or not had_all:
            self._set_head_deadline(unsure=True)  # a request ended in this data
        elif data and (self._head_deadline is None or self._head_unsure):
            self._set_head_deadline(unsure=False)  # the first bytes of a request's head

    def connection_lost(self, exc: BaseException | None) -> None:
        self._head_deadline = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def _has_all_bytes(self) -> bool:
        """Whether the newest request parsed (if any) has all its body."""
        return self._newest is None or self._newest.is_eof()

    def _set_head_deadline(self, *, unsure: bool) -> None:
        if self._head_timeout is None:
            return
        self._head_unsure = unsure
        self._head_deadline = self._loop.time() + self._head_timeout
        if self._head_timer is None:
            self._head_timer = self._loop.call_at(self._head_deadline, self._head_time_is_up)

    def _head_time_is_up(self) -> None:
        self._head_timer = None
        deadline = self._head_deadline
        if deadline is None or self.transport is None or self._force_close or self._close:
            return
        if self._loop.time() < deadline:  # moved since the timer was set
            self._head_timer = self._loop.call_at(deadline, self._head_time_is_up)
            return
        waiting = self._waiter is not None and not self._waiter.done()
        if not waiting or not self._has_all_bytes():  # a request is being answered
            self._set_head_deadline(unsure=self._head_unsure)  # look again later
            return
        self._head_deadline = None
        partial = holds_partial_request(self._parser)
        if not partial and self._request_count:
            return  # an idle keep-alive connection: aiohttp's keepalive timeout's business
        log.debug("closing a connection whose request headers did not arrive in time")
        if partial:
            assert self._head_timeout is not None
            self.transport.write(head_timeout_response(self._head_timeout))
        self.force_close()


def holds_partial_request(parser: Any) -> bool:
    """Whether aiohttp's request parser holds part of a request whose head is not complete.

    Its parsers say so nowhere public. The pure-Python one keeps the head's lines in `_lines`
    and `_tail`. The C one (llhttp) keeps its state in C; its `feed_eof()` returns nothing
    when no request has begun, and else turns the partial head into a message or raises: it
    is only asked when the connection is closed if the answer is yes. Covered for both
    parsers by tests/test_server_slow_headers.py.
    """
    lines = getattr(parser, "_lines", None)
    if lines is not None:
        return bool(lines or parser._tail)
    try:
        return parser.feed_eof() is not None
    except Exception:
        return True  # a request had begun that cannot be completed


class QuietServer(web.Server):
    header_read_timeout: float | None = None

    def __call__(self) -> RequestHandler:
        return QuietRequestHandler(
            self, loop=self._loop, header_read_timeout=self.header_read_timeout, **self._kwargs
        )


class AppRunner(web.AppRunner):
    """web.AppRunner whose server answers unparsable requests without quoting them and closes
    connections whose request headers do not arrive within `header_read_timeout` seconds."""

    def __init__(
        self, app: web.Application, *, header_read_timeout: float | None = None, **kwargs: Any
    ) -> None:
        super().__init__(app, **kwargs)
        self._header_read_timeout = header_read_timeout

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = QuietServer  # same state; only how handlers are made differs
        assert isinstance(server, QuietServer)
        server.header_read_timeout = self._header_read_timeout
        return server
