"""Two real OS processes hammering one principal's limit at the same moment.

Sharing a Redis they admit one quota between them; with memory stores each process admits
its own quota, so together they overspend by 2x: why several instances need redis://.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.redis_server import RedisServer, start_or_skip

REPO = Path(__file__).resolve().parents[1]
# Sent in waves over ~0.25 s (the whole quota takes a process ~20 ms on its own), so the two
# processes' attempts overlap in time, not one after the other.
ATTEMPTS_PER_PROCESS = 1200
COST = 30  # 10 prompt + 20 max_tokens
QUOTA = 30_000 // COST

WORKER = """
import asyncio, sys
from pathlib import Path
from llmserve.config import LimitsConfig, TierConfig
from llmserve.errors import RateLimited
from llmserve.limits import Limiter, store_from_url

WAVE = 50

async def main(url, state_dir, attempts):
    tier = TierConfig(requests_per_minute=100_000, tokens_per_minute=30_000)
    config = LimitsConfig(store=url, state_dir=Path(state_dir), tiers={"default": tier})
    limiter = Limiter(config, store_from_url(url, config.state_dir), lambda: 1741953600.0)
    await limiter.usage("warm-up", None, {})  # connect before the race starts
    print("ready", flush=True)
    sys.stdin.readline()
    calls = []
    for _ in range(attempts // WAVE):  # in waves over ~0.25 s, so that the two bursts overlap
        calls += [asyncio.ensure_future(limiter.reserve("alice", None, {}, 10, 20))
                  for _ in range(WAVE)]
        await asyncio.sleep(0.01)
    results = await asyncio.gather(*calls, return_exceptions=True)
    bad = [r for r in results if isinstance(r, BaseException) and not isinstance(r, RateLimited)]
    assert not bad, bad
    print(sum(not isinstance(r, BaseException) for r in results), flush=True)
    await limiter.close()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_or_skip(tmp_path / "redis")
    yield server
    server.stop()


def race(url: str, state_dirs: list[Path]) -> list[int]:
    """Start one worker per state dir, release them together, return what each admitted."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, url, str(d), str(ATTEMPTS_PER_PROCESS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        for d in state_dirs
    ]
    try:
        for worker in workers:
            assert worker.stdout is not None and worker.stdout.readline().strip() == "ready"
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write("go\n")
            worker.stdin.flush()
        out = [worker.communicate(timeout=60)[0] for worker in workers]
        assert all(w.returncode == 0 for w in workers), out
        return [json.loads(text.strip().splitlines()[-1]) for text in out]
    finally:
        for worker in workers:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()


@pytest.mark.redis
def test_two_processes_sharing_redis_never_exceed_the_limit(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    admitted = race(redis_server.url, [tmp_path / "a", tmp_path / "b"])
    assert sum(admitted) == QUOTA
    assert all(count > 0 for count in admitted), admitted  # both really took part


def test_two_processes_with_memory_stores_each_admit_their_own_quota(tmp_path: Path) -> None:
    admitted = race("memory://", [tmp_path / "a", tmp_path / "b"])
    assert admitted == [QUOTA, QUOTA]  # 2x the tier's limit: memory:// is per process
