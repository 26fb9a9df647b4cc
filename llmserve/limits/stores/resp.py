"""A small Redis client: one pipelined connection, written for the limiter's hot path.

    client = RespClient.from_url("redis://:secret@127.0.0.1:6379/2?socket_timeout=0.5")
    await client.call("INCR", "hits")                     # 1
    await client.call_many([("GET", "a"), ("GET", "b")])  # one write, two replies
    await client.evalsha(Script(lua_source), keys, args)  # loads the script if Redis lacks it
    await client.close()

URL forms and options: stores/urls.py. `client_from_url` also takes Sentinel
(stores/sentinel.py) and Cluster (stores/cluster.py) URLs; both are built on RespClient.

All callers share one connection. A command is sent without waiting for earlier replies
(the commands of one event-loop turn go out in one write) and Redis answers in order, so each
caller waits on a future in a FIFO deque. Redis runs commands one at a time anyway: one
connection loses no throughput, and a call costs a fraction of a pooled client's CPU.

RespFailure
├── RespError            the server answered with an error reply (`ERR ...`, `NOSCRIPT ...`)
└── RespConnectionError  no reply: could not connect, the connection was lost, or no reply
    │                    came within socket_timeout (then the connection is dropped, since
    │                    later replies could no longer be matched). A command already written
    │                    may or may not have run, so it is never sent again; the next call
    │                    reconnects.
    └── RespNotSent      no connection: the command was never written (it did not run).

Replies: simple string -> str, integer -> int, bulk string -> bytes (nil: None), array ->
list (nil: None), nested; an error inside an array is a RespError in the list.
"""

from __future__ import annotations

import asyncio
import hashlib
import select
import ssl
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol, cast

from llmserve.errors import ConfigError, LLMServeError
from llmserve.limits.stores.urls import (
    ClusterOptions,
    RespOptions,
    SentinelOptions,
    parse_any_url,
    parse_url,
)

_TIMER_SLACK = 0.001  # seconds: timers may fire this early (uvloop's clock has ms steps)

RespArg = bytes | str | int | float


class RespFailure(LLMServeError):
    """A Redis call failed; see the module docstring for the two kinds."""


class RespError(RespFailure):
    """The server's error reply, e.g. `NOSCRIPT No matching script`."""


class RespConnectionError(RespFailure):
    """No reply (connect failed, connection lost, or timeout): the outcome is unknown."""


class RespNotSent(RespConnectionError):
    """No connection (it could not be made, or the client is closed): the command was never
    written, so it certainly did not run."""


# --- wire format ------------------------------------------------------------------------


def encode_command(args: Sequence[RespArg]) -> bytes:
    """One command as a RESP array of bulk strings; numbers are sent as their decimal text."""
    # Built as text and encoded once: a third cheaper than encoding each argument.
    parts = [f"*{len(args)}\r\n"]
    for arg in args:
        if type(arg) is bytes:
            return _encode_binary(args)
        text = str(arg)
        parts.append(f"${len(text)}\r\n{text}\r\n")
    command = "".join(parts)
    return command.encode() if command.isascii() else _encode_binary(args)


def _encode_binary(args: Sequence[RespArg]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


INCOMPLETE: Any = object()  # what RespParser.pop returns until a whole reply has arrived


class RespParser:
    """RESP2 replies from a byte stream fed in chunks of any size. Malformed: ValueError."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def pop(self) -> Any:
        """The next complete reply, else INCOMPLETE (and the bytes so far stay buffered)."""
        reply, end = _parse(self._buffer, 0)
        if end > 0:
            del self._buffer[:end]
        return reply

    @property
    def buffered(self) -> int:
        return len(self._buffer)


def _parse(buf: bytearray, pos: int) -> tuple[Any, int]:
    """The reply starting at `pos` and the position after it, or (INCOMPLETE, -1)."""
    eol = buf.find(b"\r\n", pos)
    if eol < 0:
        return INCOMPLETE, -1
    kind, line = buf[pos], buf[pos + 1 : eol]
    if kind == 0x24:  # $ bulk string
        return _parse_bulk(buf, int(line), eol + 2)
    if kind == 0x2A:  # * array
        return _parse_array(buf, int(line), eol + 2)
    if kind == 0x3A:  # : integer
        return int(line), eol + 2
    if kind == 0x2B:  # + simple string
        return line.decode(), eol + 2
    if kind == 0x2D:  # - error
        return RespError(line.decode(errors="replace")), eol + 2
    raise ValueError(f"unknown RESP reply type {chr(kind)!r}")


def _parse_bulk(buf: bytearray, size: int, start: int) -> tuple[Any, int]:
    if size < 0:
        return None, start
    end = start + size
    if len(buf) < end + 2:
        return INCOMPLETE, -1
    if buf[end : end + 2] != b"\r\n":
        raise ValueError("bulk string longer than its announced size")
    return bytes(buf[start:end]), end + 2


def _parse_array(buf: bytearray, count: int, pos: int) -> tuple[Any, int]:
    if count < 0:
        return None, pos
    items = []
    for _ in range(count):
        item, pos = _parse(buf, pos)
        if pos < 0:
            return INCOMPLETE, -1
        items.append(item)
    return items, pos


# --- connection -------------------------------------------------------------------------

_HANGUP = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR | select.POLLNVAL


class _Connection(asyncio.Protocol):
    """One socket: sends commands as they come, hands replies to waiters in FIFO order."""

    def __init__(self, reply_timeout: float, where: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout = reply_timeout
        self._where = where
        self._parser = RespParser()
        # (deadline, future, batch): batch 0 is one command, n is n commands in one write.
        self._waiters: deque[tuple[float, asyncio.Future[Any], int]] = deque()
        self._batch: list[Any] = []
        self._out: list[bytes] = []  # commands not written yet (see request)
        # One timer, for the oldest waiter only: deadlines grow in FIFO order, so it is due
        # first. Cheaper than a timer per call.
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self._poller: Any = None  # select.poll on our socket, where POLLRDHUP exists (Linux)
        self._lost: asyncio.Future[None] = self._loop.create_future()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        if hasattr(select, "POLLRDHUP") and sock is not None:
            self._poller = select.poll()
            self._poller.register(sock.fileno(), select.POLLIN | select.POLLRDHUP)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"connection lost ({exc or 'closed by the server'})")
        if not self._lost.done():
            self._lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        parser.feed(data)
        try:
            while self._waiters:
                reply = parser.pop()
                if reply is INCOMPLETE:
                    return
                self._deliver(reply)
            if parser.buffered:
                raise ValueError("a reply to no command")
        except ValueError as exc:
            self.abort(f"protocol error ({exc})")

    def request(self, payload: bytes, batch: int = 0) -> asyncio.Future[Any]:
        """Send one command (batch 0) or `batch` commands; the future gets the reply (a list
        of `batch` replies). Never resent: a failure fails the future instead."""
        if self.closed or self._transport is None:
            raise RespConnectionError(f"redis at {self._where}: connection closed")
        future = self._loop.create_future()
        deadline = self._loop.time() + self._timeout
        self._waiters.append((deadline, future, batch))
        if self._timer is None:
            self._timer = self._loop.call_at(deadline, self._check_deadline)
        # Commands of one loop iteration go out in one write, at the end of it: under load
        # one syscall carries many commands (half the CPU per call at 32 in flight).
        self._out.append(payload)
        if len(self._out) == 1:
            self._loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        out, self._out = self._out, []
        if not self.closed and self._transport is not None:
            self._transport.write(b"".join(out))

    def usable(self) -> bool:
        """False once closed, or when the server hung up while no reply was owed (it
        restarted): then nothing is lost, and the caller connects again before writing."""
        if self.closed:
            return False
        if self._waiters or self._poller is None:
            return True
        events = self._poller.poll(0)
        if not events or not events[0][1] & _HANGUP:
            return True
        self.abort("closed by the server")
        return False

    def abort(self, reason: str) -> None:
        self._fail(reason)
        if self._transport is not None:
            self._transport.abort()

    async def close(self) -> None:
        self._fail("client closed")
        if self._transport is not None:
            self._transport.close()
            try:  # a TLS close waits for the server's close_notify: not for long
                await asyncio.wait_for(asyncio.shield(self._lost), self._timeout)
            except TimeoutError:
                self._transport.abort()

    def _deliver(self, reply: Any) -> None:
        _, future, batch = self._waiters[0]
        if batch:
            self._batch.append(reply)
            if len(self._batch) < batch:
                return
            reply, self._batch = self._batch, []
        self._waiters.popleft()
        if future.done():  # its caller was cancelled: the reply is dropped, the FIFO intact
            return
        if isinstance(reply, RespError):
            future.set_exception(reply)
        else:
            future.set_result(reply)

    def _check_deadline(self) -> None:
        self._timer = None
        if not self._waiters:
            return
        deadline = self._waiters[0][0]
        now = self._loop.time()
        if deadline - now > _TIMER_SLACK or self._reply_is_waiting():
            # Not due yet, or the reply is in the socket but the loop (uvloop runs timers
            # before reading) has not read it yet: a stalled loop is not a slow Redis.
            retry_at = max(deadline, now + _TIMER_SLACK)
            self._timer = self._loop.call_at(retry_at, self._check_deadline)
            return
        self.abort(f"no reply within {self._timeout}s")

    def _reply_is_waiting(self) -> bool:
        return self._poller is not None and any(
            revents & select.POLLIN for _, revents in self._poller.poll(0)
        )

    def _fail(self, reason: str) -> None:
        """Close for good and fail every waiter; each gets its own exception object."""
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiters, self._waiters = self._waiters, deque()
        message = f"redis at {self._where}: {reason}; a command sent may or may not have run"
        for _, future, _ in waiters:
            if not future.done():
                future.set_exception(RespConnectionError(message))


# --- client -----------------------------------------------------------------------------


class Script:
    """A Lua script and its SHA1, computed here so EVALSHA needs no SCRIPT LOAD first."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()


class RedisClient(Protocol):
    """What the stores use: RespClient (one server), SentinelClient (stores/sentinel.py) and
    ClusterClient (stores/cluster.py) all have it. Same failures: module docstring."""

    @property
    def where(self) -> str:
        """The server(s), for messages (never a password)."""
        ...

    async def call(self, *args: RespArg) -> Any: ...

    async def call_many(self, commands: Sequence[Sequence[RespArg]]) -> list[Any]: ...

    async def evalsha(
        self, script: Script, keys: Sequence[str], args: Sequence[RespArg]
    ) -> Any: ...

    async def ping(self) -> str: ...

    async def close(self) -> None: ...


def client_from_url(url: str) -> RedisClient:
    """The client a URL names (every form of stores/urls.py); nothing connects until the
    first call. ConfigError for a bad URL, or TLS files that cannot be read."""
    options = parse_any_url(url)
    if isinstance(options, SentinelOptions):
        from llmserve.limits.stores.sentinel import SentinelClient

        return SentinelClient(options)
    if isinstance(options, ClusterOptions):
        from llmserve.limits.stores.cluster import ClusterClient

        return ClusterClient(options)
    return RespClient(options)


def ssl_context(options: RespOptions) -> ssl.SSLContext:
    """The TLS settings of a rediss* URL as a context; ConfigError when a file is unusable."""
    try:
        context = ssl.create_default_context(cafile=options.ssl_ca_certs)
        if options.ssl_certfile is not None:
            context.load_cert_chain(options.ssl_certfile, options.ssl_keyfile)
    except (OSError, ssl.SSLError) as exc:
        files = [options.ssl_ca_certs, options.ssl_certfile, options.ssl_keyfile]
        named = ", ".join(f for f in files if f)
        raise ConfigError(f"Redis TLS: cannot use {named}: {exc}") from None
    if options.ssl_cert_reqs == "none":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif not options.ssl_check_hostname:
        context.check_hostname = False
    return context


class RespClient:
    """Connects on the first call (concurrent first callers share one attempt), sends AUTH
    and SELECT first when the URL asks, and reconnects on the next call after a failure.

    `role="master"`: a new connection also asks ROLE and is refused (RespNotSent) unless
    the server is a master (Sentinel: the address it gave may be out of date)."""

    def __init__(
        self,
        options: RespOptions,
        *,
        role: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.options = options
        self._role = role
        self._conn: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None
        # Built now: a CA file that cannot be read is a config error at start-up.
        self._ssl = tls or (ssl_context(options) if options.tls else None)
        self._closed = False

    @classmethod
    def from_url(cls, url: str) -> RespClient:
        """One server (redis://, rediss://, unix://; stores/urls.py). Nothing connects until
        the first call. Sentinel and Cluster URLs: client_from_url."""
        return cls(parse_url(url))

    @property
    def where(self) -> str:
        return self.options.where

    async def call(self, *args: RespArg) -> Any:
        conn = self._conn
        if conn is None or not conn.usable():
            conn = await self._connected()
        return await conn.request(encode_command(args))

    async def ping(self) -> str:
        return str(await self.call("PING"))  # "PONG"

    async def call_many(self, commands: Sequence[Sequence[RespArg]]) -> list[Any]:
        """Several commands in one write; raises the first error reply among them."""
        replies = await self.pipeline(commands)
        for reply in replies:
            if isinstance(reply, RespError):
                raise reply
        return replies

    async def pipeline(self, commands: Sequence[Sequence[RespArg]]) -> list[Any]:
        """Several commands in one write; their replies, an error reply as a RespError."""
        if not commands:
            return []
        conn = self._conn
        if conn is None or not conn.usable():
            conn = await self._connected()
        payload = b"".join([encode_command(c) for c in commands])
        replies: list[Any] = await conn.request(payload, len(commands))
        return replies

    async def evalsha(self, script: Script, keys: Sequence[str], args: Sequence[RespArg]) -> Any:
        """EVALSHA; on NOSCRIPT (the script did not run) load it and run it, in one write."""
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            return await self.call(*command)
        except RespError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        _, reply = await self.call_many([("SCRIPT", "LOAD", script.source), command])
        return reply

    async def close(self) -> None:
        """Fail calls in flight, close the connection; later calls raise RespConnectionError."""
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def _connected(self) -> _Connection:
        if self._closed:
            raise RespNotSent(f"redis at {self.options.where}: client closed")
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
            self._connecting.add_done_callback(self._connect_done)
        attempt = self._connecting
        try:
            # Shielded: a caller cancelled while waiting must not cancel the others' connect.
            return await asyncio.shield(attempt)
        except asyncio.CancelledError:
            if attempt.cancelled() and self._closed:  # close() ended it, not our caller
                raise RespNotSent(f"redis at {self.options.where}: client closed") from None
            raise

    def _connect_done(self, attempt: asyncio.Future[_Connection]) -> None:
        self._connecting = None
        if not attempt.cancelled():
            attempt.exception()  # retrieved, even when every caller gave up waiting

    async def _connect(self) -> _Connection:
        options = self.options
        try:
            conn = await asyncio.wait_for(self._open(), options.socket_connect_timeout)
        except TimeoutError:
            raise RespNotSent(
                f"redis at {options.where}: no connection within {options.socket_connect_timeout}s"
            ) from None
        except OSError as exc:  # ssl.SSLError too: a certificate refused
            raise RespNotSent(f"redis at {options.where}: cannot connect ({exc})") from exc
        if self._closed:  # close() came while connecting: the connection must not outlive it
            conn.abort("client closed")
            raise RespNotSent(f"redis at {options.where}: client closed")
        self._conn = conn
        return conn

    async def _open(self) -> _Connection:
        options = self.options
        loop = asyncio.get_running_loop()
        conn = _Connection(options.socket_timeout, options.where)
        if options.unix_path is not None:
            await loop.create_unix_connection(lambda: conn, options.unix_path)
        else:
            await loop.create_connection(
                lambda: conn,
                options.host,
                options.port,
                ssl=self._ssl,
                server_hostname=options.ssl_server_hostname if self._ssl is not None else None,
            )
        try:
            await self._handshake(conn)
        except BaseException:
            conn.abort("connection set-up failed")
            raise
        return conn

    async def _handshake(self, conn: _Connection) -> None:
        commands = handshake_commands(self.options)
        if self._role is not None:
            commands.append(("ROLE",))
        if not commands:
            return
        payload = b"".join([encode_command(c) for c in commands])
        try:
            replies = await conn.request(payload, len(commands))
        except RespNotSent:
            raise
        except RespConnectionError as exc:  # lost while setting up: no caller's command sent
            raise RespNotSent(str(exc)) from exc
        for command, reply in zip(commands, replies, strict=True):
            if isinstance(reply, RespError):
                raise RespNotSent(
                    f"redis at {self.options.where}: {_command_name(command[0])} refused: {reply}"
                )
        if self._role is not None:
            role = replies[-1][0] if isinstance(replies[-1], list) and replies[-1] else b"?"
            if _command_name(role) != self._role:
                raise RespNotSent(
                    f"redis at {self.options.where}: is a {_command_name(role)}, not a {self._role}"
                )


def handshake_commands(options: RespOptions) -> list[tuple[RespArg, ...]]:
    """What a new connection sends before any caller's command."""
    commands: list[tuple[RespArg, ...]] = []
    if options.password is not None:
        user = (options.username,) if options.username else ()
        commands.append(("AUTH", *user, options.password))
    if options.db:
        commands.append(("SELECT", options.db))
    return commands


def _command_name(name: RespArg) -> str:
    return name.decode(errors="replace") if isinstance(name, bytes) else str(name)
