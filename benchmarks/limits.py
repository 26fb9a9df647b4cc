"""Limiter decisions per second and added latency per decision, for each store.

    .venv/bin/python benchmarks/limits.py                # starts a throwaway Redis-compatible
    .venv/bin/python benchmarks/limits.py --redis-url redis://127.0.0.1:6379/0 --n 20000

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
from collections.abc import Callable
from pathlib import Path

from llmserve.config import LimitsConfig, TierConfig
from llmserve.limits import Limiter, Store
from llmserve.limits.stores.memory import MemoryStore
from llmserve.limits.stores.redis import RedisStore

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


def start_redis(workdir: Path) -> tuple[str, Callable[[], None]]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support.redis_server import RedisServer

    server = RedisServer.start_new(workdir)
    print(f"started {server.binary} on {server.url}", flush=True)
    return server.url, server.stop


async def main_async(args: argparse.Namespace, redis_url: str) -> None:
    await measure("memory", MemoryStore, args.n)
    state_dir = Path(tempfile.mkdtemp(prefix="limits-bench-"))
    await measure("memory+diskcache", lambda: MemoryStore(state_dir), args.n)
    await measure("redis", lambda: RedisStore.from_url(redis_url, key_prefix="bench:"), args.n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="Requests per measurement.")
    parser.add_argument("--redis-url", help="Use this Redis instead of starting one.")
    args = parser.parse_args()
    stop: Callable[[], None] = lambda: None  # noqa: E731
    redis_url = args.redis_url
    if redis_url is None:
        redis_url, stop = start_redis(Path(tempfile.mkdtemp(prefix="limits-bench-redis-")))
    try:
        asyncio.run(main_async(args, redis_url))
    finally:
        stop()


if __name__ == "__main__":
    main()
