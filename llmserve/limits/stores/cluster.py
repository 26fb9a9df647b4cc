"""Redis Cluster: each command goes to the node that owns its key's slot.

    client = ClusterClient(parse_cluster_url("redis+cluster://:pw@10.0.0.1:7000,10.0.0.2:7000"))

Our own client, not redis-py's RedisCluster: the stores need only single-slot commands
(every key of one principal carries the hash tag `{principal}`, and each key-store command
touches one key), so routing is a slot map in front of one RespClient per master node, and a
call costs what it costs against one server (BENCHMARKS.md measures both clients).

- The slot map is read with CLUSTER SLOTS from the first node that answers (the nodes known,
  then the URL's) before the first call, and again, in the background, after a MOVED reply
  or a failure to reach a node (at most every REFRESH_INTERVAL seconds): calls do not wait
  for it, and a node that does not answer delays no call to the others.
- A command's slot is CRC16 of its first key (of the part between `{` and `}`, when there is
  one) modulo 16384; keyless commands (PING, CONFIG, SCRIPT...) go to any node.
- MOVED (the slot has moved for good, the command did not run): the slot's entry is changed
  at once, the command is sent to the new owner, and the whole map is read again before the
  next call. ASK (the slot is being migrated, the key is on the target already): ASKING and
  the command are sent to the target, the map unchanged. TRYAGAIN (a multi-key command while
  its slot is half migrated: the scripts' keys may be on both sides): sent again after 5 ms,
  10 ms, 20 ms... for at most socket_timeout in all. None of these replies ran the command,
  so sending it again is safe; after MAX_REDIRECTS redirections the call fails.
- A node that cannot be reached fails the calls for its slots, like one server, and the map
  is read again, from the other nodes first (a replica may have taken over its slots). A call
  that could not even connect (RespNotSent: nothing was sent) waits for that read, at most
  socket_timeout, and goes to the new owner when the map names one: the first call after a
  replica's promotion reaches it. A call whose connection was lost after sending fails.
- Between a master's death and its replica's promotion (cluster-node-timeout, then the
  election), the other nodes answer CLUSTERDOWN for every slot while the cluster requires full
  coverage (Redis' default): those calls fail too.
- call_many sends each node its share of the commands in one write (renewing the holds of
  many principals), and returns the replies in the order of the commands.
"""

from __future__ import annotations

import asyncio
import binascii
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from llmserve.limits.stores.resp import (
    RespArg,
    RespClient,
    RespConnectionError,
    RespError,
    RespFailure,
    RespNotSent,
    Script,
    ssl_context,
)
from llmserve.limits.stores.urls import ClusterOptions

SLOTS = 16384
MAX_REDIRECTS = 5
REFRESH_INTERVAL = 0.1  # seconds: the slot map is read at most this often
_FIRST_TRYAGAIN_DELAY = 0.005  # seconds, doubled each time
# Commands that name no key: sent to any node.
_KEYLESS = frozenset(
    {"PING", "ECHO", "CONFIG", "SCRIPT", "INFO", "CLIENT", "CLUSTER", "ROLE", "TIME", "ACL",
     "DBSIZE", "FLUSHALL", "FLUSHDB", "COMMAND", "HELLO", "AUTH", "SELECT", "MEMORY", "SLOWLOG"}
)  # fmt: skip

Address = tuple[str, int]


def key_slot(key: str | bytes) -> int:
    """The cluster slot of a key: CRC16 (XMODEM, what binascii.crc_hqx computes) of its hash
    tag, the text between the first `{` and the next `}` when not empty, else of the key."""
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return binascii.crc_hqx(data, 0) % SLOTS


def command_slot(args: Sequence[RespArg]) -> int | None:
    """The slot a command must go to, None when any node will do."""
    name = _text(args[0]).upper()
    if name in ("EVAL", "EVALSHA", "FCALL", "FCALL_RO"):
        return _key_slot_arg(args[3]) if len(args) > 3 and int(args[2]) > 0 else None
    if name in _KEYLESS or len(args) < 2:
        return None
    return _key_slot_arg(args[1])


@dataclass
class ClusterStats:
    moved: int = 0  # MOVED replies followed
    asked: int = 0  # ASK replies followed
    tryagain: int = 0  # TRYAGAIN replies waited out
    refreshes: int = 0  # slot maps read


class ClusterClient:
    """RedisClient (stores/resp.py) for a Redis Cluster; see the module docstring."""

    def __init__(self, options: ClusterOptions) -> None:
        self.options = options
        self._tls = ssl_context(options.node) if options.node.tls else None
        self._nodes: dict[Address, RespClient] = {}
        self._slots: list[Address | None] = [None] * SLOTS
        self._masters: list[Address] = []
        self._stale = True
        self._refreshed_at = float("-inf")
        self._refreshing: asyncio.Future[None] | None = None
        self._unreachable: set[Address] = set()  # nodes whose last connection failed
        self._closed = False
        self.stats = ClusterStats()

    @property
    def where(self) -> str:
        return self.options.where

    def node_for(self, slot: int) -> Address | None:
        """The node the map says owns `slot` (None before the map is read)."""
        return self._slots[slot]

    async def call(self, *args: RespArg) -> Any:
        return await self._routed(
            command_slot(args),
            lambda node: node.call(*args),
            lambda node: _second(node.call_many([("ASKING",), args])),
        )

    async def call_many(self, commands: Sequence[Sequence[RespArg]]) -> list[Any]:
        """Each node's commands in one write; the replies in order; raises the first error."""
        if not commands:
            return []
        await self._ready()
        groups: dict[Address, list[int]] = {}
        for index, command in enumerate(commands):
            groups.setdefault(self._address(command_slot(command)), []).append(index)
        replies: list[Any] = [None] * len(commands)
        outcomes = await asyncio.gather(
            *(self._send_group(address, indexes, commands, replies)
              for address, indexes in groups.items()),
            return_exceptions=True,
        )  # fmt: skip
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        for reply in replies:
            if isinstance(reply, RespError):
                raise reply
        return replies

    async def evalsha(self, script: Script, keys: Sequence[str], args: Sequence[RespArg]) -> Any:
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)

        async def asking(node: RespClient) -> Any:
            try:
                return await _second(node.call_many([("ASKING",), command]))
            except RespError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise
            load = ("SCRIPT", "LOAD", script.source)
            return (await node.call_many([load, ("ASKING",), command]))[2]

        return await self._routed(
            key_slot(keys[0]) if keys else None,
            lambda node: node.evalsha(script, keys, args),
            asking,
        )

    async def ping(self) -> str:
        return str(await self.call("PING"))

    async def close(self) -> None:
        self._closed = True
        if self._refreshing is not None:
            self._refreshing.cancel()
        nodes, self._nodes = list(self._nodes.values()), {}
        await asyncio.gather(*(node.close() for node in nodes))

    # -- routing -----------------------------------------------------------------------------

    async def _routed(
        self,
        slot: int | None,
        send: Callable[[RespClient], Awaitable[Any]],
        send_asking: Callable[[RespClient], Awaitable[Any]],
    ) -> Any:
        await self._ready()
        loop = asyncio.get_running_loop()
        asking: Address | None = None
        redirects = 0
        delay, waited = _FIRST_TRYAGAIN_DELAY, 0.0
        while True:
            address = asking or self._address(slot)
            node = self._node(address)
            try:
                return await (send_asking(node) if asking else send(node))
            except RespError as exc:
                kind, moved_slot, target = _redirection(exc)
                if kind == "TRYAGAIN" and waited + delay <= self.options.node.socket_timeout:
                    self.stats.tryagain += 1
                    started = loop.time()
                    await asyncio.sleep(delay)
                    waited += loop.time() - started
                    delay, asking = delay * 2, None
                    continue
                if kind == "CLUSTERDOWN":
                    self._stale = True
                if kind not in ("MOVED", "ASK") or target is None:
                    raise
                if not target[0] or target[0] == "?":  # the node knows no address of it
                    target = (address[0], target[1])
                redirects += 1
                if redirects > MAX_REDIRECTS:
                    raise RespError(f"redis {self.where}: too many redirections ({exc})") from None
                if kind == "MOVED":
                    self.stats.moved += 1
                    self._slots[moved_slot] = target
                    self._stale = True  # read the whole map before the next call
                    asking = None
                else:
                    self.stats.asked += 1
                    asking = target
            except RespNotSent:
                self._lost(address)
                redirects += 1  # not sent: safe to send to a new owner, if the map names one
                if asking is not None or redirects > MAX_REDIRECTS:
                    raise
                if not await self._owner_changed(slot, address):
                    raise
            except RespConnectionError:
                self._lost(address)
                raise

    async def _send_group(
        self,
        address: Address,
        indexes: list[int],
        commands: Sequence[Sequence[RespArg]],
        replies: list[Any],
    ) -> None:
        try:
            answers = await self._node(address).pipeline([commands[i] for i in indexes])
        except RespConnectionError:
            self._lost(address)
            raise
        for index, answer in zip(indexes, answers, strict=True):
            if isinstance(answer, RespError) and _redirection(answer)[0] in (
                "MOVED", "ASK", "TRYAGAIN"
            ):  # fmt: skip
                try:  # it did not run: once more, routed on its own
                    answer = await self.call(*commands[index])
                except RespError as exc:
                    answer = exc
            replies[index] = answer

    def _lost(self, address: Address) -> None:
        """`address` could not be reached: its slots may have a new master by now, and the
        map is read from the other nodes first."""
        self._unreachable.add(address)
        self._stale = True

    async def _owner_changed(self, slot: int | None, address: Address) -> bool:
        """After `address` could not be reached (nothing sent): read the map again, unless it
        was read within REFRESH_INTERVAL, waiting at most socket_timeout; True when it now
        names another node for `slot` (a replica promoted in place of a dead master)."""
        loop = asyncio.get_running_loop()
        attempt = self._refreshing
        if attempt is None:
            if self._closed or loop.time() - self._refreshed_at < REFRESH_INTERVAL:
                return False
            attempt = self._start_refresh()
        try:
            await asyncio.wait_for(asyncio.shield(attempt), self.options.node.socket_timeout)
        except (TimeoutError, RespFailure):
            return False
        except asyncio.CancelledError:
            if attempt.cancelled() and self._closed:
                return False
            raise
        owner = self._slots[slot] if slot is not None else self._address(None)
        return owner is not None and owner != address

    def _address(self, slot: int | None) -> Address:
        if slot is None:
            return self._masters[0] if self._masters else self.options.nodes[0]
        address = self._slots[slot]
        if address is None:
            self._stale = True
            raise RespNotSent(f"redis {self.where}: no node serves slot {slot} (cluster down?)")
        return address

    def _node(self, address: Address) -> RespClient:
        node = self._nodes.get(address)
        if node is None:
            if self._closed:
                raise RespNotSent(f"redis {self.where}: client closed")
            options = replace(self.options.node, host=address[0], port=address[1])
            node = self._nodes[address] = RespClient(options, tls=self._tls)
        return node

    # -- the slot map ------------------------------------------------------------------------

    async def _ready(self) -> None:
        """Read the slot map when it is stale (a MOVED, a node lost): in the background, at
        most every REFRESH_INTERVAL, while calls go on with the map they have. Only the
        first read is waited for (concurrent first callers share it)."""
        if not self._stale:
            return
        if self._closed:
            raise RespNotSent(f"redis {self.where}: client closed")
        if self._masters:
            now = asyncio.get_running_loop().time()
            if self._refreshing is None and now - self._refreshed_at >= REFRESH_INTERVAL:
                self._start_refresh()
            return
        attempt = self._refreshing or self._start_refresh()
        try:
            await asyncio.shield(attempt)
        except asyncio.CancelledError:
            if attempt.cancelled() and self._closed:
                raise RespNotSent(f"redis {self.where}: client closed") from None
            raise

    def _start_refresh(self) -> asyncio.Future[None]:
        self._refreshing = attempt = asyncio.ensure_future(self._refresh())
        attempt.add_done_callback(self._refresh_done)
        return attempt

    def _refresh_done(self, attempt: asyncio.Future[None]) -> None:
        self._refreshing = None
        if not attempt.cancelled():
            attempt.exception()

    async def _refresh(self) -> None:
        self.stats.refreshes += 1
        self._refreshed_at = asyncio.get_running_loop().time()
        failures = []
        known = dict.fromkeys([*self._masters, *self.options.nodes])
        # Nodes that could not be reached are asked last: a host that is down may take
        # socket_connect_timeout to fail, and the map is what tells where its slots went.
        for address in sorted(known, key=lambda address: address in self._unreachable):
            try:
                reply = await self._node(address).call("CLUSTER", "SLOTS")
            except RespFailure as exc:
                if isinstance(exc, RespConnectionError):
                    self._unreachable.add(address)
                failures.append(str(exc))
                continue
            self._unreachable.discard(address)
            self._install(reply, address)
            return
        raise RespNotSent(f"redis {self.where}: no node gave the slot map ({'; '.join(failures)})")

    def _install(self, reply: Any, asked: Address) -> None:
        """CLUSTER SLOTS: [[first slot, last slot, [host, port, id, ...], replicas...], ...]."""
        slots: list[Address | None] = [None] * SLOTS
        masters: dict[Address, None] = {}
        for first, last, master, *_ in reply:
            host = _text(master[0]) if master[0] else ""
            address = (host if host and host != "?" else asked[0], int(master[1]))
            masters[address] = None
            slots[first : last + 1] = [address] * (last - first + 1)
        self._slots = slots
        self._masters = list(masters)
        self._stale = False


def _redirection(exc: RespError) -> tuple[str, int, Address | None]:
    """(kind, slot, target) of `MOVED 3999 127.0.0.1:6381`, `ASK ...`; (first word, 0,
    None) of any other error reply."""
    words = str(exc).split()
    kind = words[0] if words else ""
    if kind in ("MOVED", "ASK") and len(words) >= 3:
        host, _, port = words[2].rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if port.isdigit() and words[1].isdigit():
            return kind, int(words[1]), (host, int(port))
    return kind, 0, None


async def _second(replies: Awaitable[list[Any]]) -> Any:
    """The command's reply of an [ASKING, command] pipeline."""
    return (await replies)[1]


def _key_slot_arg(arg: RespArg) -> int:
    return key_slot(arg if isinstance(arg, bytes) else str(arg))


def _text(value: RespArg) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
