"""SSEStream beyond one fast client: a client that falls behind gets every event in order after
the engine is done; one heartbeat task serves every open stream."""

from __future__ import annotations

import asyncio
import json
import socket

from llmserve.engine.fake import WORDS, FakeEngine
from tests.support.api import chat_body, make_config

TOKENS = 90_000  # ~14 MB of events: more than the kernel buffers of both sockets hold


async def test_a_slow_reader_gets_every_event_in_order_after_the_engine_is_done(
    app_client, tmp_path, monkeypatch
):
    from llmserve.api.sse import SSEStream

    backlogs: list[int] = []
    drain_backlog = SSEStream._drain_backlog

    async def counted(self: SSEStream) -> None:
        backlogs.append(1)
        await drain_backlog(self)

    monkeypatch.setattr(SSEStream, "_drain_backlog", counted)
    config = make_config(tmp_path, engine={"max_model_len": 100_000})
    engine = FakeEngine("fake", 100_000)  # full speed: far faster than this reader
    client = await app_client(config, engine)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", client.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 22)
    payload = json.dumps(chat_body(max_tokens=TOKENS, stream=True)).encode()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
        + payload
    )
    await writer.drain()
    try:
        async with asyncio.timeout(20):
            while not engine.finished:  # nothing read yet: the socket is full long before
                await asyncio.sleep(0.01)
            body = await reader.read()  # now read it all
    finally:
        writer.close()
    events = [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    expected = "".join(WORDS[i % len(WORDS)] + " " for i in range(TOKENS))
    assert text == expected  # every token, in order
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert backlogs, "the socket never filled: the queued path was not exercised"


async def test_one_heartbeat_task_serves_every_stream_and_ends_with_them(app_client, tmp_path):
    config = make_config(tmp_path, server={"heartbeat_seconds": 0.05})
    engine = FakeEngine("fake", 256, ttft_seconds=0.3)  # silent for 0.3 s: heartbeats are due
    client = await app_client(config, engine)

    def beating() -> list[asyncio.Task]:
        return [t for t in asyncio.all_tasks() if t.get_name() == "sse-heartbeats"]

    async def stream() -> bytes:
        resp = await client.post("/v1/chat/completions", json=chat_body(max_tokens=2, stream=True))
        return await resp.read()

    streams = [asyncio.ensure_future(stream()) for _ in range(20)]
    await asyncio.sleep(0.2)
    assert len(beating()) == 1  # not one per stream
    bodies = await asyncio.gather(*streams)
    assert all(b": keep-alive" in body and body.endswith(b"data: [DONE]\n\n") for body in bodies)
    await asyncio.sleep(0.1)
    assert beating() == []  # no stream left: the task has ended


async def test_events_made_within_one_loop_turn_share_a_write(app_client, tmp_path, monkeypatch):
    """The fake engine at full speed hands over 16 tokens per event-loop turn: the first goes out
    at once, the other 15 together, so 256 tokens take ~32 writes, not 256."""
    from llmserve.api.sse import SSEStream

    writes: list[bytes] = []
    write = SSEStream.write

    async def counted(self: SSEStream, data: bytes) -> None:
        writes.append(data)
        await write(self, data)

    monkeypatch.setattr(SSEStream, "write", counted)
    config = make_config(tmp_path, engine={"max_model_len": 4096})
    client = await app_client(config, FakeEngine("fake", 4096))
    resp = await client.post("/v1/chat/completions", json=chat_body(max_tokens=256, stream=True))
    body = await resp.read()
    events = [line for line in body.split(b"\n") if line.startswith(b"data: ")]
    assert len(events) == 1 + 256 + 1 + 1  # role+first token, 255 tokens, finish, [DONE]
    assert len(writes) <= 40, len(writes)
    assert b"".join(writes) == body  # nothing lost or reordered on the way
