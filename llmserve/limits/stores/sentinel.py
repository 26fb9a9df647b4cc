"""Redis Sentinel: find the master through the sentinels, follow it when it fails over.

    client = SentinelClient(parse_sentinel_url(
        "redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2:26379/mymaster?db=0"))

Our own client, not redis-py's Sentinel: discovery is one command (`SENTINEL
GET-MASTER-ADDR-BY-NAME`) and the master is then an ordinary RespClient, so a call costs
exactly what it costs against one server (BENCHMARKS.md measures both).

- The first call asks the sentinels, in order, for the master's address: the first that
  answers is asked first from then on. A new connection to that address checks with ROLE
  that it is a master (a sentinel may not know yet that it failed over).
- When the master fails (connection lost or refused, no reply within socket_timeout) or
  answers READONLY (it was demoted to a replica; also NOREPLICAS, MASTERDOWN), the calls in
  flight fail as they would against one server, and the next call asks the sentinels again.
- While calls succeed, the sentinels are still asked, in the background, at most every
  CHECK_INTERVAL seconds, whether the master is the same: after a failover ordered while the
  old master was up (`SENTINEL FAILOVER`, a network partition) the old master goes on
  accepting writes until the sentinels demote it, seconds later, and what it took then is
  lost. So calls move to the new master within CHECK_INTERVAL of the switch. During a failover the
  sentinels still name the old master until they have promoted a replica, so calls fail
  (RespNotSent: they did not run) until then; the store turns that into StoreUnavailable
  and `limits.on_store_error` applies. Once a replica is promoted, the next call reaches it.
- Redis replicates asynchronously: a charge acknowledged by the old master in the last
  moment before it died may not have reached the replica that replaces it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

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
from llmserve.limits.stores.urls import SentinelOptions

T = TypeVar("T")
CHECK_INTERVAL = 1.0  # seconds between two checks that the master is still the master
# Error replies (also inside a script's error) of a server that is no master to write to now:
# demoted to a replica, or refusing writes (min-replicas-to-write) while cut off.
_NOT_A_MASTER = re.compile(r"(^|\s)(READONLY|NOREPLICAS|MASTERDOWN)\s")


class SentinelClient:
    """RedisClient (stores/resp.py) for the master a set of sentinels name."""

    def __init__(self, options: SentinelOptions) -> None:
        self.options = options
        tls = ssl_context(options.master) if options.master.tls else None
        self._tls = tls
        self._sentinels = [
            RespClient(replace(options.sentinel, host=host, port=port), tls=tls)
            for host, port in options.sentinels
        ]
        self._master: RespClient | None = None
        self._discovering: asyncio.Future[RespClient] | None = None
        self._checking: asyncio.Task[None] | None = None
        self._check_at = 0.0
        self._retired: set[RespClient] = set()  # masters left, closed once their calls end
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False
        self.discoveries = 0  # masters looked up (first call, after failures)
        self.switches = 0  # masters left because the sentinels named another

    @property
    def where(self) -> str:
        master = self._master
        now = f" (master {master.where})" if master is not None else ""
        return f"master {self.options.where}{now}"

    @property
    def master_address(self) -> tuple[str, int] | None:
        """The master in use, None before the first call and after it failed."""
        master = self._master
        return (master.options.host, master.options.port) if master is not None else None

    async def call(self, *args: RespArg) -> Any:
        return await self._on_master(lambda master: master.call(*args))

    async def call_many(self, commands: Sequence[Sequence[RespArg]]) -> list[Any]:
        return await self._on_master(lambda master: master.call_many(commands))

    async def evalsha(self, script: Script, keys: Sequence[str], args: Sequence[RespArg]) -> Any:
        return await self._on_master(lambda master: master.evalsha(script, keys, args))

    async def ping(self) -> str:
        return str(await self.call("PING"))

    async def close(self) -> None:
        self._closed = True
        if self._discovering is not None:
            self._discovering.cancel()
        if self._checking is not None:
            self._checking.cancel()
        master, self._master = self._master, None
        clients = [*self._sentinels, *self._retired, *([master] if master else [])]
        await asyncio.gather(*(client.close() for client in clients))
        for task in self._closing:
            task.cancel()
        await asyncio.gather(*self._closing, return_exceptions=True)

    async def _on_master(self, send: Callable[[RespClient], Awaitable[T]]) -> T:
        master = self._master or await self._discovered()
        now = asyncio.get_running_loop().time()
        if now >= self._check_at and self._checking is None:
            self._check_at = now + CHECK_INTERVAL
            self._checking = asyncio.ensure_future(self._check(master))
            self._checking.add_done_callback(self._check_done)
        try:
            return await send(master)
        except RespConnectionError:
            self._forget(master)
            raise
        except RespError as exc:
            if _NOT_A_MASTER.search(str(exc)):
                self._forget(master)  # demoted, or cut off from its replicas
            raise

    def _forget(self, master: RespClient) -> None:
        """Ask the sentinels again on the next call. The old master's connection is closed
        once the calls in flight on it have had their socket_timeout to end."""
        if self._master is not master:
            return  # another caller's failure already did
        self._master = None
        self._retired.add(master)
        task = asyncio.ensure_future(self._retire(master))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _retire(self, master: RespClient) -> None:
        try:
            await asyncio.sleep(master.options.socket_timeout)
        finally:
            self._retired.discard(master)
            await master.close()

    async def _discovered(self) -> RespClient:
        if self._closed:
            raise RespNotSent(f"redis {self.where}: client closed")
        if self._discovering is None:
            self._discovering = asyncio.ensure_future(self._discover())
            self._discovering.add_done_callback(self._discover_done)
        attempt = self._discovering
        try:
            return await asyncio.shield(attempt)  # one discovery for every caller waiting
        except asyncio.CancelledError:
            if attempt.cancelled() and self._closed:
                raise RespNotSent(f"redis {self.where}: client closed") from None
            raise

    def _discover_done(self, attempt: asyncio.Future[RespClient]) -> None:
        self._discovering = None
        if not attempt.cancelled():
            attempt.exception()  # retrieved, even when every caller gave up waiting

    async def _check(self, master: RespClient) -> None:
        """Leave `master` when the sentinels name another one (a failover it did not see)."""
        try:
            address = await self._ask_sentinels()
        except RespFailure:
            return  # no sentinel answered: keep the master that works
        if address != (master.options.host, master.options.port):
            self.switches += 1
            self._forget(master)

    def _check_done(self, task: asyncio.Task[None]) -> None:
        self._checking = None
        if not task.cancelled():
            task.exception()

    async def _discover(self) -> RespClient:
        self.discoveries += 1
        host, port = await self._ask_sentinels()
        master_options = replace(self.options.master, host=host, port=port)
        master = RespClient(master_options, role="master", tls=self._tls)
        if self._closed:
            await master.close()
            raise RespNotSent(f"redis {self.where}: client closed")
        self._master = master
        return master

    async def _ask_sentinels(self) -> tuple[str, int]:
        """The master's address, from the first sentinel that knows it."""
        name = self.options.service_name
        failures = []
        for sentinel in list(self._sentinels):
            try:
                reply = await sentinel.call("SENTINEL", "GET-MASTER-ADDR-BY-NAME", name)
            except RespFailure as exc:
                failures.append(str(exc))
                continue
            if not isinstance(reply, list) or len(reply) != 2:
                failures.append(f"sentinel {sentinel.where} knows no master {name!r}")
                continue
            if sentinel is not self._sentinels[0]:  # it is asked first next time
                self._sentinels.remove(sentinel)
                self._sentinels.insert(0, sentinel)
            return reply[0].decode(), int(reply[1])
        raise RespNotSent(
            f"redis master {self.options.where}: no sentinel named it ({'; '.join(failures)})"
        )
