"""A client that declares a body and sends only part of it holds a connection no longer than
`server.body_read_timeout_seconds`: it gets a 408 and is closed, while others are served."""

from __future__ import annotations

import socket
import time

import httpx

from tests.support.process import llmserve_up
from tests.test_server_auth import auth_config, create_key

STALLED = 200


def test_partial_bodies_are_cut_off_while_normal_requests_go_on(tmp_path):
    config = auth_config(tmp_path, body_read_timeout_seconds=1.0)
    with llmserve_up(tmp_path, config) as server:
        key = create_key(tmp_path, next(tmp_path.glob("llmserve-*.yaml")))
        port = int(server.base_url.rsplit(":", 1)[1])
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n"
        ).encode()
        stalled = []
        for _ in range(STALLED):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(head + b'{"model": "')  # 11 of the 1,000 bytes declared
            stalled.append(sock)
        started = time.monotonic()
        ok = httpx.post(server.base_url + "/v1/chat/completions",
                        headers={"Authorization": f"Bearer {key}"},
                        json={"model": "fake", "max_tokens": 2,
                              "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
        assert ok.status_code == 200  # served while 200 connections stall
        answers = []
        for sock in stalled:
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            answers.append(data.split(b"\r\n", 1)[0])
            sock.close()
        elapsed = time.monotonic() - started
    assert all(b" 408 " in line for line in answers), set(answers)
    assert elapsed < 10  # all cut off at about 1 s, not held
