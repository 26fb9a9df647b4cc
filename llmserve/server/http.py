"""aiohttp's HTTP server, with one change: a request it cannot parse (a NUL or a bare CR in a
header, a header over the limit) gets a fixed JSON answer. aiohttp's own 400 quotes the
offending bytes, and those may hold an API key: no response may ever contain a credential.

aiohttp offers no setting for this; `AppRunner` below makes its server build request handlers
of this module's class (aiohttp 3.x internals, covered by tests/test_server_http_errors.py).
"""

from __future__ import annotations

import json

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

_UNPARSABLE = json.dumps({
    "error": {
        "message": "The request is not valid HTTP (a malformed or oversized header line); "
                   "nothing of it was processed.",
        "type": "invalid_request_error", "param": None, "code": "bad_http_request",
    }
})  # fmt: skip


class QuietRequestHandler(RequestHandler):
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


class QuietServer(web.Server):
    def __call__(self) -> RequestHandler:
        return QuietRequestHandler(self, loop=self._loop, **self._kwargs)


class AppRunner(web.AppRunner):
    """web.AppRunner whose server answers unparsable requests without quoting them."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = QuietServer  # same state; only how handlers are made differs
        return server
