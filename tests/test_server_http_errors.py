"""A request aiohttp cannot parse gets a fixed JSON 400 that quotes nothing of it: no response
may ever contain a credential (aiohttp's own 400 quotes the offending header line)."""

from __future__ import annotations

import socket

import pytest

from tests.support.process import llmserve_up
from tests.test_server_auth import auth_config

SECRET = "sk-llms-0123456789ab-THISISTHESECRETPART0123456789"


def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


@pytest.mark.parametrize(
    "header",
    [
        f"Authorization: Bearer {SECRET}\x00x".encode(),  # a NUL after the key
        f"Authorization: Bearer {SECRET}\rx".encode(),  # a bare CR
        f"X-API-Key: {SECRET}\x7f\x01".encode(),  # other control bytes
    ],
)
def test_an_unparsable_header_is_answered_without_quoting_it(tmp_path, header):
    with llmserve_up(tmp_path, auth_config(tmp_path)) as server:
        port = int(server.base_url.rsplit(":", 1)[1])
        reply = _raw(port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n\r\n")
        server.terminate()
        log = server.log()
    status, _, body = reply.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.") and b" 400 " in status.split(b"\r\n")[0]
    assert b'"code": "bad_http_request"' in body
    assert b"THISISTHESECRETPART" not in reply
    assert "THISISTHESECRETPART" not in log  # the parser's error is logged redacted
