"""A client that opens a connection and never finishes its request's headers (sends part of
them, or a byte now and then) holds it no longer than `server.header_read_timeout_seconds`: it
gets a 408 and is closed, while others are served. Clients slow within the limit, and idle
keep-alive connections, are served as before."""

from __future__ import annotations

import asyncio
import contextlib
import selectors
import socket
import threading
import time

import httpx
import pytest
from aiohttp import http_parser

from llmserve.server.http import holds_partial_request
from tests.support.process import ServerProcess, llmserve_up

TIMEOUT = 1.0
KEEPALIVE = 3.0
STALLED = 200
TRICKLING = 10
HEAD = b"GET /health HTTP/1.1\r\nHost: x\r\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    tmp_path = tmp_path_factory.mktemp("slow-headers")
    config = {
        "engine": {"kind": "fake", "served_model_name": "fake", "max_model_len": 512},
        "auth": {"enabled": False},
        "limits": {"state_dir": str(tmp_path / "limits")},
        "usage": {"ledger": str(tmp_path / "usage.jsonl")},
        "server": {"header_read_timeout_seconds": TIMEOUT,
                   "keepalive_timeout_seconds": KEEPALIVE},
    }
    with llmserve_up(tmp_path, config) as running:
        yield running


def _port(server: ServerProcess) -> int:
    return int(server.base_url.rsplit(":", 1)[1])


def _connect(server: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", _port(server)), timeout=10)


def _read_to_close(sock: socket.socket, timeout: float = 10) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _status(reply: bytes) -> bytes:
    return reply.split(b"\r\n", 1)[0]


def _responses(sock: socket.socket, count: int) -> list[bytes]:
    """Read `count` responses (each with a Content-Length body) from a keep-alive socket."""
    sock.settimeout(10)
    buffer, out = b"", []
    while len(out) < count:
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            assert chunk, f"closed after {len(out)} responses: {buffer!r}"
            buffer += chunk
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))  # fmt: skip
        while len(buffer) < length:
            buffer += sock.recv(65536)
        out.append(head + b"\r\n\r\n" + buffer[:length])
        buffer = buffer[length:]
    return out


class HealthPoller(threading.Thread):
    """GET /health on its own connections, one after another, recording each latency."""

    def __init__(self, base_url: str) -> None:
        super().__init__(daemon=True)
        self.base_url = base_url
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                status = httpx.get(self.base_url + "/health", timeout=10).status_code
            except httpx.HTTPError as exc:
                self.failures.append(repr(exc))
                continue
            self.latencies.append(time.monotonic() - started)
            if status != 200:
                self.failures.append(f"status {status}")
            time.sleep(0.02)


def test_partial_headers_are_cut_off_while_normal_requests_go_on(server):
    poller = HealthPoller(server.base_url)
    poller.start()
    opened: dict[socket.socket, float] = {}
    trickling: list[socket.socket] = []
    try:
        for _ in range(STALLED):
            sock = _connect(server)
            opened[sock] = time.monotonic()
            sock.sendall(HEAD)  # the request line and one header, never the blank line
        for _ in range(TRICKLING):  # one byte at a time, as long as the connection is open
            sock = _connect(server)
            opened[sock] = time.monotonic()
            sock.sendall(b"G")
            trickling.append(sock)
        replies, closed = _wait_for_close(list(opened), trickling, deadline=TIMEOUT + 10)
    finally:
        poller.stop.set()
        poller.join(15)
        for sock in opened:
            sock.close()
    assert len(closed) == len(opened)  # every one of them was closed by the server
    held = [closed[sock] - opened[sock] for sock in opened]
    assert min(held) > TIMEOUT * 0.9  # not before the limit...
    assert max(held) < TIMEOUT + 3  # ...and soon after it, trickling or not
    statuses = {_status(reply) for reply in replies.values()}
    assert statuses == {b"HTTP/1.1 408 Request Timeout"}, statuses
    assert all(b'"code": "request_timeout"' in reply for reply in replies.values())
    assert poller.failures == []
    assert len(poller.latencies) >= 10  # /health kept answering meanwhile...
    assert max(poller.latencies) < 1.0  # ...promptly


def _wait_for_close(
    socks: list[socket.socket], trickling: list[socket.socket], deadline: float
) -> tuple[dict[socket.socket, bytes], dict[socket.socket, float]]:
    """Read every socket until the server closes it (what it got, and when), sending one more
    byte of a request line on each `trickling` socket every 0.2 s until then."""
    selector = selectors.DefaultSelector()
    for sock in socks:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    replies = {sock: b"" for sock in socks}
    closed: dict[socket.socket, float] = {}
    end = time.monotonic() + deadline
    next_byte = time.monotonic() + 0.2
    line = b"ET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"y" * 1000
    sent = 0
    while len(closed) < len(socks) and time.monotonic() < end:
        for key, _ in selector.select(timeout=0.05):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if chunk:
                replies[sock] += chunk
            else:
                closed[sock] = time.monotonic()
                selector.unregister(sock)
        if time.monotonic() >= next_byte:
            next_byte += 0.2
            for sock in trickling:
                if sock not in closed:
                    with contextlib.suppress(OSError):  # closed: the next recv says so
                        sock.send(line[sent : sent + 1])
            sent += 1
    selector.close()
    return replies, closed


def test_a_slow_head_within_the_limit_is_served(server):
    with _connect(server) as sock:
        for piece in (b"GET /health HT", b"TP/1.1\r\nHo", b"st: x\r\n", b"\r\n"):
            sock.sendall(piece)
            time.sleep(TIMEOUT / 6)  # all of it within the limit, over 2/3 of it
        (reply,) = _responses(sock, 1)
    assert _status(reply) == b"HTTP/1.1 200 OK"


def test_an_idle_keep_alive_connection_is_served_after_the_limit(server):
    with _connect(server) as sock:
        sock.sendall(HEAD + b"\r\n")
        (first,) = _responses(sock, 1)
        time.sleep(TIMEOUT * 2)  # idle between requests: not a slow head
        sock.sendall(HEAD + b"\r\n")
        (second,) = _responses(sock, 1)
        time.sleep(TIMEOUT * 1.5)
        sock.sendall(HEAD)  # a later request's head, slow but within the limit from its start
        time.sleep(TIMEOUT / 2)
        sock.sendall(b"\r\n")
        (third,) = _responses(sock, 1)
    assert [_status(r) for r in (first, second, third)] == [b"HTTP/1.1 200 OK"] * 3


def test_an_idle_keep_alive_connection_is_closed_after_the_keepalive_timeout(server):
    with _connect(server) as sock:
        sock.sendall(HEAD + b"\r\n")
        (reply,) = _responses(sock, 1)
        idle_since = time.monotonic()
        assert _read_to_close(sock, timeout=KEEPALIVE * 3) == b""
        idle = time.monotonic() - idle_since
    assert _status(reply) == b"HTTP/1.1 200 OK"
    assert KEEPALIVE * 0.9 < idle < KEEPALIVE * 2.5, idle


def test_a_later_request_on_a_keep_alive_connection_is_timed_from_its_first_byte(server):
    with _connect(server) as sock:
        sock.sendall(HEAD + b"\r\n")
        (first,) = _responses(sock, 1)
        time.sleep(TIMEOUT * 1.5)
        sock.sendall(b"GET /he")
        started = time.monotonic()
        reply = _read_to_close(sock)
        held = time.monotonic() - started
    assert _status(first) == b"HTTP/1.1 200 OK"
    assert _status(reply) == b"HTTP/1.1 408 Request Timeout"
    assert TIMEOUT * 0.9 < held < TIMEOUT + 3


def test_a_partial_request_pipelined_behind_a_whole_one_is_cut_off(server):
    with _connect(server) as sock:
        started = time.monotonic()
        sock.sendall(HEAD + b"\r\n" + b"GET /health HTTP/1.1\r\n")  # the second never ends
        (first,) = _responses(sock, 1)
        rest = _read_to_close(sock)
        held = time.monotonic() - started
    assert _status(first) == b"HTTP/1.1 200 OK"
    assert _status(rest) == b"HTTP/1.1 408 Request Timeout"
    assert held < TIMEOUT + 3


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(server):
    with _connect(server) as sock:
        started = time.monotonic()
        reply = _read_to_close(sock)
        held = time.monotonic() - started
    assert reply == b""  # nothing was asked: nothing to answer
    assert TIMEOUT * 0.9 < held < TIMEOUT + 3


class _Protocol:
    """What aiohttp's parsers call back on the protocol."""

    _reading_paused = False

    def pause_reading(self) -> None: ...

    def resume_reading(self, resume_parser: bool = True) -> None: ...


@pytest.mark.parametrize("parser_name", ["HttpRequestParserC", "HttpRequestParserPy"])
@pytest.mark.parametrize(
    ("data", "partial"),
    [
        (b"", False),
        (b"\r\n", False),  # blank lines between requests are allowed
        (b"G", True),
        (b"GET / HTT", True),
        (HEAD, True),
        (HEAD + b"\r\n", False),
        (HEAD + b"\r\n\r\n", False),
        (HEAD + b"\r\nG", True),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nab", False),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nabGET / HTTP/1.1\r\n", True),
    ],
)
async def test_the_parser_tells_whether_it_holds_part_of_a_request(parser_name, data, partial):
    parser_class = getattr(http_parser, parser_name, None)
    if parser_class is None:  # aiohttp installed without its C extension
        pytest.skip(f"aiohttp has no {parser_name} here")
    loop = asyncio.get_running_loop()
    parser = parser_class(_Protocol(), loop, 2**16, max_line_size=8190, max_field_size=8190)
    parser.feed_data(data)
    assert holds_partial_request(parser) is partial
