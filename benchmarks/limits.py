"""Limiter decisions per second and added latency per decision, for each store.

    .venv/bin/python benchmarks/limits.py                # starts a throwaway Redis-compatible
    .venv/bin/python benchmarks/limits.py --redis-url redis://127.0.0.1:6379/0 --n 20000
    .venv/bin/python benchmarks/limits.py --kinds tls,sentinel,cluster --clients own,redis-py

--kinds: memory, redis (one server), tls (one server, mutual TLS with a private CA),
sentinel (a master, a replica, three sentinels: the store asks the sentinels, then the
master), cluster (three masters; principals spread over them). --clients: `own` is
llmserve's client (stores/resp.py, sentinel.py, cluster.py); `redis-py` puts redis-py's
asyncio clients (Redis, Sentinel.master_for, RedisCluster; needs `pip install redis`) behind
the same store, for comparison.

A "decision" is one reserve; a request costs a reserve plus a settle. The tier has the usual
three windows (requests/min, tokens/min, tokens/day) and limits far above the load, so every
reserve is admitted and does the full work. Sequential runs measure latency (one request at
a time); the concurrent run measures throughput with many requests in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from llmserve.config import LimitsConfig, TierConfig
from llmserve.limits import Limiter, Store
from llmserve.limits.stores.memory import MemoryStore
from llmserve.limits.stores.redis import RedisStore
from llmserve.limits.stores.resp import RespArg, Script

TIER = TierConfig(requests_per_minute=10**9, tokens_per_minute=10**12, tokens_per_day=10**13)
CONFIG = LimitsConfig(tiers={"default": TIER})
PRINCIPALS = [f"key{i:04d}" for i in range(1000)]


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def sequential(limiter: Limiter, n: int) -> dict[str, float]:
    reserve_us: list[float] = []
    settle_us: list[float] = []
    started = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        reservation = await limiter.reserve(PRINCIPALS[i % len(PRINCIPALS)], None, {}, 100, 200)
        t1 = time.perf_counter()
        await limiter.settle(reservation, 100, 50)
        t2 = time.perf_counter()
        reserve_us.append((t1 - t0) * 1e6)
        settle_us.append((t2 - t1) * 1e6)
    elapsed = time.perf_counter() - started
    return {
        "reserve_p50_us": statistics.median(reserve_us),
        "reserve_p99_us": percentile(reserve_us, 0.99),
        "settle_p50_us": statistics.median(settle_us),
        "settle_p99_us": percentile(settle_us, 0.99),
        "requests_per_s": n / elapsed,  # reserve + settle, one at a time
    }


async def concurrent(limiter: Limiter, n: int, in_flight: int) -> float:
    """Decisions (reserve + settle pairs) per second with `in_flight` requests at once."""
    per_task = n // in_flight

    async def worker(offset: int) -> None:
        for i in range(per_task):
            principal = PRINCIPALS[(offset + i * in_flight) % len(PRINCIPALS)]
            reservation = await limiter.reserve(principal, None, {}, 100, 200)
            await limiter.settle(reservation, 100, 50)

    started = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(in_flight)))
    return per_task * in_flight / (time.perf_counter() - started)


async def redis_ping_us(store: RedisStore, n: int) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        await store.client.ping()
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


async def measure(name: str, make_store: Callable[[], Store], n: int) -> dict[str, float]:
    limiter = Limiter(CONFIG, make_store())
    await sequential(limiter, min(n, 2000))  # warm-up: scripts loaded, pool and caches full
    result = await sequential(limiter, n)
    result["concurrent_64_requests_per_s"] = await concurrent(limiter, n, 64)
    if isinstance(limiter.store, RedisStore):
        result["redis_ping_p50_us"] = await redis_ping_us(limiter.store, 2000)
    await limiter.close()
    print(f"{name}: " + ", ".join(f"{k}={v:,.1f}" for k, v in result.items()), flush=True)
    return result


def _support() -> Any:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.support import redis_server, tls

    return redis_server, tls


def start_redis(workdir: Path) -> tuple[str, Callable[[], None]]:
    redis_server, _ = _support()
    server = redis_server.RedisServer.start_new(workdir)
    print(f"started {server.binary} on {server.url}", flush=True)
    return server.url, server.stop


def start_kind(kind: str, workdir: Path) -> tuple[str, Callable[[], None]]:
    """A throwaway deployment of this kind: (llmserve URL, stop)."""
    redis_server, tls = _support()
    binary = redis_server.find_server_binary()
    if kind == "tls":
        ca = tls.TestCA.create(workdir / "ca")
        cert, key = ca.issue("server", dns=["redis.internal"])
        client_cert, client_key = ca.issue("client")
        server = redis_server.RedisServer.start_new(
            workdir / "tls", binary, tls=redis_server.ServerTls(cert, key, ca.cert)
        )
        query = (f"ssl_ca_certs={ca.cert}&ssl_certfile={client_cert}&ssl_keyfile={client_key}"
                 "&ssl_server_hostname=redis.internal")  # fmt: skip
        return f"rediss://127.0.0.1:{server.port}/0?{query}", server.stop
    if kind == "sentinel":
        group = redis_server.SentinelGroup.start_new(workdir / "sentinel", binary)
        return group.url, group.stop
    if kind == "cluster":
        nodes = redis_server.ClusterNodes.start_new(workdir / "cluster", binary)
        return nodes.url, nodes.stop
    raise ValueError(kind)


class RedisPyClient:
    """redis-py's asyncio client behind the RedisClient interface (stores/resp.py)."""

    def __init__(self, client: Any, where: str) -> None:
        self._client = client
        self.where = where

    async def call(self, *args: RespArg) -> Any:
        return await self._client.execute_command(*args)

    async def call_many(self, commands: Sequence[Sequence[RespArg]]) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(await pipe.execute())

    async def evalsha(self, script: Script, keys: Sequence[str], args: Sequence[RespArg]) -> Any:
        from redis.exceptions import NoScriptError

        try:
            return await self._client.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self._client.eval(script.source, len(keys), *keys, *args)

    async def ping(self) -> str:
        await self._client.ping()
        return "PONG"

    async def close(self) -> None:
        await self._client.aclose()


def redis_py_client(url: str) -> RedisPyClient:
    """The same deployment through redis-py (plain, TLS, Sentinel or Cluster)."""
    from redis.asyncio import Redis
    from redis.asyncio.cluster import ClusterNode, RedisCluster
    from redis.asyncio.sentinel import Sentinel

    from llmserve.limits.stores.urls import ClusterOptions, SentinelOptions, parse_any_url

    options = parse_any_url(url)
    if isinstance(options, SentinelOptions):
        timeouts = {"socket_timeout": options.master.socket_timeout}
        sentinel = Sentinel(list(options.sentinels), **timeouts)
        master = sentinel.master_for(options.service_name, **timeouts)
        return RedisPyClient(master, f"redis-py sentinel {options.where}")
    if isinstance(options, ClusterOptions):
        nodes = [ClusterNode(host, port) for host, port in options.nodes]
        cluster = RedisCluster(startup_nodes=nodes, socket_timeout=options.node.socket_timeout)
        return RedisPyClient(cluster, f"redis-py {options.where}")
    tls: dict[str, Any] = {}
    if options.tls:
        tls = {"ssl": True, "ssl_ca_certs": options.ssl_ca_certs,
               "ssl_certfile": options.ssl_certfile, "ssl_keyfile": options.ssl_keyfile,
               "ssl_check_hostname": False}  # fmt: skip
    client = Redis(host=options.host, port=options.port, db=options.db,
                   socket_timeout=options.socket_timeout, **tls)  # fmt: skip
    return RedisPyClient(client, f"redis-py {options.where}")


async def main_async(args: argparse.Namespace, urls: dict[str, str]) -> None:
    kinds = args.kinds.split(",")
    if "memory" in kinds:
        await measure("memory", MemoryStore, args.n)
        state_dir = Path(tempfile.mkdtemp(prefix="limits-bench-"))
        await measure("memory+diskcache", lambda: MemoryStore(state_dir), args.n)
    for kind, url in urls.items():
        for client in args.clients.split(","):
            if client == "own":
                make = lambda url=url: RedisStore.from_url(url, key_prefix="bench:")  # noqa: E731
            else:
                make = lambda url=url: RedisStore(redis_py_client(url), "bench:")  # type: ignore[arg-type]  # noqa: E731
            await measure(f"{kind} ({client})", make, args.n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="Requests per measurement.")
    parser.add_argument("--redis-url", help="Use this Redis instead of starting one.")
    parser.add_argument("--kinds", default="memory,redis", help="What to measure (see above).")
    parser.add_argument("--clients", default="own", help="own, redis-py, or both: own,redis-py")
    args = parser.parse_args()
    stops: list[Callable[[], None]] = []
    urls: dict[str, str] = {}
    workdir = Path(tempfile.mkdtemp(prefix="limits-bench-redis-"))
    try:
        for kind in args.kinds.split(","):
            if kind == "redis":
                if args.redis_url:
                    urls[kind] = args.redis_url
                else:
                    urls[kind], stop = start_redis(workdir / "redis")
                    stops.append(stop)
            elif kind != "memory":
                urls[kind], stop = start_kind(kind, workdir)
                stops.append(stop)
        asyncio.run(main_async(args, urls))
    finally:
        for stop in stops:
            stop()


if __name__ == "__main__":
    main()
