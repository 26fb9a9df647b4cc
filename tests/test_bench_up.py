"""`llmserve bench` against a real `llmserve up` on the fake engine (a child process)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from llmserve.bench.client import Target
from llmserve.bench.datasets import random_requests
from llmserve.bench.runner import run_load
from llmserve.bench.stats import compute_metrics, llmserve_breakdown

REPO = Path(__file__).resolve().parents[1]
CONFIG = """
server: {{host: 127.0.0.1, port: {port}}}
engine: {{kind: fake, served_model_name: fake, fake: {{tokens_per_second: {tps}}}}}
auth: {{enabled: true, keys: {tmp}/keys}}
limits:
  state_dir: {tmp}/limits
  default_tier: pro
  tiers: {{free: {{requests_per_minute: 2}}, pro: {{requests_per_minute: 1000}}}}
usage: {{ledger: null}}
{extra}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _llmserve(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "llmserve", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=check)


async def _wait_healthy(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(300):  # at most ~30 s: the fake engine starts in well under a second
            try:
                async with session.get(f"{url}/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("llmserve up did not become healthy")


@contextlib.contextmanager
def _llmserve_up(tmp_path: Path, tps: float = 500, extra: str = "") -> Iterator[tuple[str, Path]]:
    port = _free_port()
    config = tmp_path / "llmserve.yaml"
    config.write_text(CONFIG.format(port=port, tmp=tmp_path, tps=tps, extra=extra))
    process = subprocess.Popen(
        [sys.executable, "-m", "llmserve", "up", "-c", str(config)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield f"http://127.0.0.1:{port}", config
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    with _llmserve_up(tmp_path) as running:
        yield running


@pytest.fixture
def one_slot_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """One request at a time, no queue: every concurrent request beyond the first gets 503."""
    queue = "queue: {max_concurrency: 1, max_depth: 0}"
    with _llmserve_up(tmp_path, tps=50, extra=queue) as running:
        yield running


def _new_key(config: Path, name: str, tier: str) -> str:
    done = _llmserve("keys", "create", "--name", name, "--tier", tier, "--json", "-c", str(config))
    return json.loads(done.stdout)["key"]


async def test_bench_measures_llmserve_on_the_fake_engine(server: tuple[str, Path]) -> None:
    url, config = server
    key = _new_key(config, "bench", "pro")
    await _wait_healthy(url)
    target = Target(base_url=url, model="fake", endpoint="/v1/chat/completions", api_keys=(key,))
    samples = random_requests(20, 10, 6, seed=0)
    outcome = await run_load(target, samples, [0.0] * 20, max_concurrency=4)
    metrics = compute_metrics(outcome.results, outcome.duration, [50.0])
    assert (metrics.completed, metrics.failed) == (20, 0)
    assert metrics.total_output == 20 * 6  # the server's usage, not a chunk count
    # The fake engine renders a chat as "user: <10 words>\nassistant:": 12 prompt tokens.
    assert metrics.total_input == 20 * 12
    assert metrics.ttft.median > 0 and metrics.itl.median > 0
    wait = llmserve_breakdown(outcome.results, [50.0])["server_queue_wait_ms"]
    assert wait is not None and wait["count"] == 20  # X-Queue-Wait-Ms on every stream


async def test_bench_counts_llmserve_auth_rejections(server: tuple[str, Path]) -> None:
    url, _ = server
    await _wait_healthy(url)
    target = Target(base_url=url, model="fake", api_keys=("sk-not-a-key",))
    outcome = await run_load(target, random_requests(3, 4, 2, seed=0), [0.0] * 3)
    extra = llmserve_breakdown(outcome.results, [50.0])
    assert extra["status_counts"] == {"401": 3}
    assert all(r.error_code and r.error_message for r in outcome.results)


async def test_bench_sorts_llmserve_rate_limits_by_limit(server: tuple[str, Path]) -> None:
    url, config = server
    free = _new_key(config, "free", "free")  # 2 requests per minute
    await _wait_healthy(url)
    target = Target(base_url=url, model="fake", api_keys=(free,))
    outcome = await run_load(target, random_requests(4, 4, 2, seed=0), [0.0] * 4)
    extra = llmserve_breakdown(outcome.results, [50.0])
    if "429" not in extra["status_counts"]:
        pytest.skip(f"this llmserve does not enforce limits yet: {extra['status_counts']}")
    assert extra["status_counts"] == {"200": 2, "429": 2}
    assert extra["rate_limited_by"] == {"requests_per_minute": 2}
    assert extra["rejection_headers"]["ok"] is True, [r.headers for r in outcome.results]


async def test_bench_sorts_llmserve_overload_by_reason(one_slot_server: tuple[str, Path]) -> None:
    url, config = one_slot_server
    key = _new_key(config, "pro", "pro")
    await _wait_healthy(url)
    target = Target(base_url=url, model="fake", api_keys=(key,))
    outcome = await run_load(target, random_requests(4, 4, 10, seed=0), [0.0] * 4)
    extra = llmserve_breakdown(outcome.results, [50.0])
    if "503" not in extra["status_counts"]:
        pytest.skip(f"this llmserve has no admission queue yet: {extra['status_counts']}")
    assert extra["status_counts"] == {"200": 1, "503": 3}
    assert set(extra["error_counts"]) == {"503:server_overloaded"}
    assert extra["rejection_headers"]["ok"] is True, [r.headers for r in outcome.results]
