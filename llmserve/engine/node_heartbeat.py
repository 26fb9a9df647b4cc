"""Heartbeats from `llmserve worker` nodes to the head, so that the head notices a node that stops.

vLLM's multiprocess backend across nodes watches only the engine processes of its own node.
Measured with vLLM 0.32 (docs/scaling.md): when a worker node running data-parallel ranks
stops, the head never learns it; `/ready` stays 200 and every request vLLM sends to those ranks
waits for ever. So each `llmserve worker` keeps one TCP connection to the head
(`engine.nodes.heartbeat_port`) and writes a line on it every second:

    worker -> head:  "llmserve-worker node 1\\n"   once, naming the node
    worker -> head:  "\\n"                          every BEAT_SECONDS
    head -> worker:  "ok\\n"                        once, after the hello

A node that has said hello counts as lost when its connection closes (its process ended: the
kernel closes the socket at once) or when it is silent for SILENT_SECONDS (host down, network
cut). The head then declares its engine dead: requests get 503, `/ready` fails, and the server
drains and exits 1 for its supervisor to restart it (engine/vllm.py). A worker keeps trying to
connect while the head is away: it joins the next head by itself.

The port is as trusted as vLLM's own handshake and torch.distributed ports: reachable from the
cluster's private network only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

BEAT_SECONDS = 1.0  # a worker writes a line this often
SILENT_SECONDS = 10.0  # the head declares a node lost after this long without a line
HELLO_SECONDS = 5.0  # a connection must say who it is within this time
HELLO = b"llmserve-worker "
MAX_LINE = 256


class HeartbeatListener:
    """The head's side: accepts worker connections and calls `on_lost(node, why)` once, for the
    first node that has said hello and then goes away."""

    def __init__(
        self,
        on_lost: Callable[[str, str], None],
        *,
        silent_seconds: float = SILENT_SECONDS,
        hello_seconds: float = HELLO_SECONDS,
    ) -> None:
        self._on_lost = on_lost
        self._silent = silent_seconds
        self._hello = hello_seconds
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.nodes: set[str] = set()  # nodes connected now
        self.lost: str | None = None  # the first node lost, and why

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._connected, host, port, limit=MAX_LINE)
        log.info("worker heartbeats: listening on %s:%d", host, port)

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if server is not None:
            with contextlib.suppress(Exception):
                await server.wait_closed()

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        node = await self._read_hello(reader)
        if node is None:
            return  # not a worker (a port scan, a health check): ignored
        self.nodes.add(node)
        log.info("worker heartbeats: %s joined", node)
        writer.write(b"ok\n")
        why = await self._follow(reader)
        self.nodes.discard(node)
        if why is not None:
            self._lose(node, why)

    async def _read_hello(self, reader: asyncio.StreamReader) -> str | None:
        try:
            line = await asyncio.wait_for(reader.readline(), self._hello)
        except (TimeoutError, ValueError, OSError):
            return None
        if not line.startswith(HELLO) or not line.endswith(b"\n"):
            return None
        node = line[len(HELLO) :].strip().decode("ascii", "replace")
        return node if node and node.isprintable() else None

    async def _follow(self, reader: asyncio.StreamReader) -> str | None:
        """Read beats until the node goes away; why it went (None: the head is closing)."""
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), self._silent)
            except TimeoutError:
                return f"sent no heartbeat for {self._silent:.0f} s"
            except (ValueError, OSError) as exc:
                return f"its connection failed ({exc.__class__.__name__})"
            if not line:
                return "closed its connection (its process ended)"

    def _lose(self, node: str, why: str) -> None:
        if self.lost is not None or self._server is None:
            return
        self.lost = f"{node} {why}"
        log.error("worker heartbeats: %s", self.lost)
        self._on_lost(node, why)


class HeartbeatSender:
    """The worker's side: a thread that keeps a connection to the head's heartbeat port and
    writes a beat every `interval` seconds, reconnecting while the head is away."""

    def __init__(
        self,
        address: tuple[str, int],
        node: str,
        *,
        interval: float = BEAT_SECONDS,
        connect_timeout: float = 2.0,
    ) -> None:
        self.address = address
        self.node = node
        self._interval = interval
        self._timeout = connect_timeout
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self.joined = threading.Event()  # set once the head has answered a hello

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llmserve-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(self._timeout + self._interval + 1)

    def _run(self) -> None:
        while not self._stopped.is_set():
            with contextlib.suppress(OSError):  # the head is away (restarting, not yet up)
                self._session()
            self._stopped.wait(self._interval)

    def _session(self) -> None:
        with socket.create_connection(self.address, timeout=self._timeout) as sock:
            self._sock = sock
            try:
                sock.sendall(HELLO + self.node.encode("ascii", "replace") + b"\n")
                if sock.recv(16).startswith(b"ok"):
                    if not self.joined.is_set():
                        log.info("heartbeats to the head at %s:%s", *self.address)
                    self.joined.set()
                while not self._stopped.wait(self._interval):
                    sock.sendall(b"\n")
            finally:
                self._sock = None
