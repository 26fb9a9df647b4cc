"""Streaming beyond the happy path: heartbeats, failures mid-stream, clients that vanish."""

from __future__ import annotations

import asyncio
import json

from llmserve.engine.fake import FakeEngine
from tests.support.api import chat_body, make_config, parse_sse


async def eventually(predicate, timeout=5.0):
    """Poll a condition that another task makes true (no fixed sleeps)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_heartbeats_are_sent_while_the_engine_is_silent(app_client, tmp_path):
    config = make_config(tmp_path, server={"heartbeat_seconds": 0.05})
    engine = FakeEngine("fake", 256, ttft_seconds=0.3)
    client = await app_client(config, engine)
    resp = await client.post("/v1/chat/completions", json=chat_body(max_tokens=2, stream=True))
    assert resp.status == 200
    events = parse_sse(await resp.read())
    comments = [e for e in events if e.startswith(b":")]
    assert len(comments) >= 2, events
    assert all(c == b": keep-alive" for c in comments)
    # the heartbeats come before any data and the stream still ends properly
    first_data = next(i for i, e in enumerate(events) if e.startswith(b"data:"))
    assert first_data >= 2
    assert events[-1] == b"data: [DONE]"


async def test_no_heartbeat_when_tokens_flow(app_client, tmp_path):
    config = make_config(tmp_path, server={"heartbeat_seconds": 5})
    client = await app_client(config, FakeEngine("fake", 256))
    resp = await client.post("/v1/chat/completions", json=chat_body(max_tokens=5, stream=True))
    events = parse_sse(await resp.read())
    assert not any(e.startswith(b":") for e in events)


async def test_failure_mid_stream_ends_with_one_error_event(app_client, config):
    engine = FakeEngine("fake", 256, fail_after_tokens=2)
    client = await app_client(config, engine)
    resp = await client.post("/v1/chat/completions", json=chat_body(max_tokens=10, stream=True))
    assert resp.status == 200
    events = parse_sse(await resp.read())
    payloads = [json.loads(e[6:]) for e in events]
    contents = [p["choices"][0]["delta"].get("content") for p in payloads[:-1]]
    assert contents == ["", "The ", "quick "]  # role, then both tokens made before the failure
    error = payloads[-1]["error"]
    assert error["code"] == "engine_error"
    assert error["type"] == "server_error"
    assert b"[DONE]" not in b"".join(events)


async def test_client_disconnect_aborts_the_engine_request(app_client, config):
    engine = FakeEngine("fake", 256, tokens_per_second=20)
    client = await app_client(config, engine)
    resp = await client.post("/v1/chat/completions", json=chat_body(max_tokens=200, stream=True))
    first = await resp.content.readuntil(b"\n\n")
    assert first.startswith(b"data: ")
    resp.close()  # the client goes away mid-stream
    await eventually(lambda: engine.aborted)
    assert list(engine.aborted) == [engine.calls[0].request_id]
    assert engine.running == 0
    assert engine.generated_tokens < 200


async def test_client_disconnect_aborts_a_non_streaming_request(app_client, config):
    engine = FakeEngine("fake", 256, tokens_per_second=20)
    client = await app_client(config, engine)
    task = asyncio.ensure_future(
        client.post("/v1/chat/completions", json=chat_body(max_tokens=200))
    )
    await eventually(lambda: engine.running == 1)
    task.cancel()  # cancelling the client request closes its connection
    await eventually(lambda: engine.aborted)
    assert engine.running == 0


async def test_request_id_is_echoed_sanitized_or_generated(client):
    resp = await client.get("/health", headers={"X-Request-Id": "abc-123"})
    assert resp.headers["X-Request-Id"] == "abc-123"
    resp = await client.get("/health", headers={"X-Request-Id": 'bad id<script>"x' + "y" * 300})
    assert resp.headers["X-Request-Id"] == ("badidscriptx" + "y" * 300)[:128]
    resp = await client.get("/health")
    assert resp.headers["X-Request-Id"].startswith("req_")
    stream = await client.post("/v1/chat/completions", json=chat_body(max_tokens=1, stream=True),
                               headers={"X-Request-Id": "s-1"})  # fmt: skip
    assert stream.headers["X-Request-Id"] == "s-1"
    error = await client.post("/v1/chat/completions", json={}, headers={"X-Request-Id": "e-1"})
    assert error.headers["X-Request-Id"] == "e-1"


async def test_a_client_that_stops_reading_is_disconnected(app_client, tmp_path):
    from llmserve.app_state import LIFECYCLE

    config = make_config(
        tmp_path,
        server={"stall_timeout_seconds": 0.3, "heartbeat_seconds": 0.1},
        engine={"kind": "fake", "served_model_name": "fake", "max_model_len": 10_000_000},
    )
    engine = FakeEngine("fake", 10_000_000)
    client = await app_client(config, engine)
    body = json.dumps(chat_body(max_tokens=5_000_000, stream=True)).encode()
    _reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()  # ... and never read: the socket buffers fill up, writes block
    lifecycle = client.app[LIFECYCLE]
    await eventually(lambda: lifecycle.in_flight == 1)
    await eventually(lambda: lifecycle.in_flight == 0, timeout=30)
    assert engine.running == 0
    assert engine.generated_tokens < 5_000_000
    writer.close()
