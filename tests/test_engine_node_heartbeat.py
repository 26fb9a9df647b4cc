"""The head's watch of its worker nodes (engine/node_heartbeat.py), over real sockets."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from llmserve.engine.node_heartbeat import HeartbeatListener, HeartbeatSender
from tests.support.process import free_port


async def _listener(**timeouts: float) -> tuple[HeartbeatListener, list[tuple[str, str]], int]:
    lost: list[tuple[str, str]] = []
    listener = HeartbeatListener(lambda node, why: lost.append((node, why)), **timeouts)
    port = free_port()
    await listener.start("127.0.0.1", port)
    return listener, lost, port


async def _until(condition: Callable[[], object], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_a_worker_whose_process_ends_is_lost_at_once() -> None:
    listener, lost, port = await _listener()
    sender = HeartbeatSender(("127.0.0.1", port), "node 1", interval=0.05)
    sender.start()
    try:
        await _until(lambda: listener.nodes == {"node 1"})
        assert sender.joined.is_set()
        sender.stop()  # what the end of its process does to the connection
        await _until(lambda: lost)
        assert lost == [("node 1", "closed its connection (its process ended)")]
        assert listener.lost == "node 1 closed its connection (its process ended)"
    finally:
        sender.stop()
        await listener.close()


async def test_a_silent_worker_is_lost_after_the_silence_allowed() -> None:
    listener, lost, port = await _listener(silent_seconds=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"llmserve-worker node 2\n")
        assert await reader.readline() == b"ok\n"
        for _ in range(5):  # beats keep it alive past the silence allowed
            writer.write(b"\n")
            await asyncio.sleep(0.1)
        assert lost == []
        await _until(lambda: lost, timeout=2)  # then it goes quiet (host down, network cut)
        assert lost == [("node 2", "sent no heartbeat for 0 s")]
    finally:
        writer.close()
        await listener.close()


async def test_connections_that_are_not_workers_are_ignored() -> None:
    listener, lost, port = await _listener(hello_seconds=0.2)
    try:
        probe = socket.create_connection(("127.0.0.1", port))  # a port scan, a TCP health check
        probe.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        assert await reader.read() == b""  # closed without an answer
        writer.close()
        _, silent = await asyncio.open_connection("127.0.0.1", port)  # says nothing at all
        await asyncio.sleep(0.4)
        silent.close()
        await asyncio.sleep(0.1)
        assert lost == [] and listener.nodes == set()
    finally:
        await listener.close()


async def test_only_the_first_lost_node_is_reported_and_closing_the_head_reports_none() -> None:
    listener, lost, port = await _listener()
    senders = [HeartbeatSender(("127.0.0.1", port), f"node {n}", interval=0.05) for n in (1, 2)]
    for sender in senders:
        sender.start()
    try:
        await _until(lambda: listener.nodes == {"node 1", "node 2"})
        senders[0].stop()
        await _until(lambda: lost)
        senders[1].stop()
        await asyncio.sleep(0.2)
        assert [node for node, _ in lost] == ["node 1"]
    finally:
        for sender in senders:
            sender.stop()
        await listener.close()

    listener, lost, port = await _listener()
    sender = HeartbeatSender(("127.0.0.1", port), "node 1", interval=0.05)
    sender.start()
    try:
        await _until(lambda: listener.nodes == {"node 1"})
        await listener.close()  # the head shutting down is not a lost worker
        assert lost == []
    finally:
        sender.stop()


async def test_a_worker_joins_a_head_that_starts_after_it() -> None:
    port = free_port()
    sender = HeartbeatSender(("127.0.0.1", port), "node 1", interval=0.05)
    sender.start()
    try:
        await asyncio.sleep(0.3)  # nothing listens yet: it keeps trying
        lost: list[tuple[str, str]] = []
        listener = HeartbeatListener(lambda node, why: lost.append((node, why)))
        await listener.start("127.0.0.1", port)
        try:
            await _until(lambda: listener.nodes == {"node 1"})
        finally:
            await listener.close()
    finally:
        sender.stop()
