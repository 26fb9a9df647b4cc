"""A client that stops reading a stream does not keep its engine slot after generation."""

from __future__ import annotations

import asyncio
import json
import socket

from llmserve.admission import AdmissionQueue
from llmserve.engine.fake import FakeEngine
from tests.support.api import chat_body, make_config


async def _open_stalled_stream(
    port: int, body: dict
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Send a streaming request on a socket with a tiny receive buffer, then never read."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    payload = json.dumps(body).encode()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    await writer.drain()
    return reader, writer


async def test_a_stalled_reader_does_not_hold_an_engine_slot_after_generation(app_client, tmp_path):
    config = make_config(tmp_path, engine={"max_model_len": 200_000})
    engine = FakeEngine("fake", 200_000)
    queue = AdmissionQueue(1, 4, 1.0)  # one engine slot; a waiter gives up after 1 s
    client = await app_client(config, engine, admission=queue)
    _reader, writer = await _open_stalled_stream(
        client.port, chat_body(max_tokens=100_000, stream=True)
    )
    try:
        async with asyncio.timeout(20):
            while not engine.finished:  # the engine finishes all 100k tokens...
                await asyncio.sleep(0.05)
        assert engine.running == 0
        # ...but the stalled writer still holds the only slot, so the next caller is refused.
        resp = await client.post("/v1/chat/completions", json=chat_body(max_tokens=1))
        assert queue.in_flight == 0 or resp.status == 200, (
            f"engine idle, yet slot held: in_flight={queue.in_flight}, next request got "
            f"{resp.status} {(await resp.json())['error']['code']}"
        )
    finally:
        writer.transport.abort()
