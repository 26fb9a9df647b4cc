"""deploy/nginx/llmserve.conf run by the real nginx in front of two real `llmserve up` processes
(the fake engine): a stream's first SSE event reaches the client long before the stream ends,
one principal's requests stay on one replica, and with a replica gone every request, POSTs
included, is answered by the other (nothing had been sent to the dead one)."""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import aiohttp

from tests.support.process import ServerProcess, free_port, kill_group, llmserve_up, wait_http
from tests.test_deploy_files import nginx_binary, nginx_test_config

TOKENS_PER_SECOND = 20
MAX_TOKENS = 40  # a stream of about 2 s
FAKE = {
    "engine": {"kind": "fake", "served_model_name": "fake", "max_model_len": 4096,
               "fake": {"ttft_seconds": 0.05, "tokens_per_second": TOKENS_PER_SECOND}},
    "auth": {"enabled": False},
    "logging": {"level": "warning"},
}  # fmt: skip


@contextlib.contextmanager
def nginx_running(tmp_path: Path, upstreams: list[str]) -> Iterator[str]:
    nginx = nginx_binary()
    port = free_port()
    # llmserve's `X-Accel-Buffering: no` alone would stop nginx buffering: ignored here, so the
    # stream test shows what deploy/nginx/llmserve.conf itself does
    main = nginx_test_config(tmp_path, upstreams, f"127.0.0.1:{port}", ignore_accel_buffering=True)
    with open(tmp_path / "nginx.out", "wb") as out:
        proc = subprocess.Popen(
            [nginx, "-p", str(tmp_path), "-c", str(main), "-e", "stderr", "-g", "daemon off;"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 15, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        kill_group(proc)


@contextlib.contextmanager
def two_replicas(tmp_path: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with llmserve_up(tmp_path / "a", FAKE) as a, llmserve_up(tmp_path / "b", FAKE) as b:
        yield a, b


def access_log(tmp_path: Path, expected: Iterable[str] = ()) -> dict[str, str]:
    """request id -> the upstreams nginx tried for it ("A, B" when it retried), from its
    access log, once it names every `expected` id: nginx logs a request after its response
    has gone out, so the client may read the response first."""
    wanted = set(expected)
    deadline = time.monotonic() + 10
    while True:
        lines = (tmp_path / "access.log").read_text().splitlines()
        found = (re.search(r"upstream=(.+?) id=(\S+)$", line) for line in lines)
        served = {m.group(2): m.group(1) for m in found if m}
        if wanted <= served.keys() or time.monotonic() > deadline:
            return served
        time.sleep(0.05)


def upstream(replica: ServerProcess) -> str:
    return replica.base_url.removeprefix("http://")


async def test_nginx_passes_each_sse_event_on_as_it_is_written(tmp_path: Path) -> None:
    body = {"model": "fake", "stream": True, "max_tokens": MAX_TOKENS,
            "messages": [{"role": "user", "content": "count"}]}  # fmt: skip
    with (
        two_replicas(tmp_path) as (a, b),
        nginx_running(tmp_path, [upstream(a), upstream(b)]) as url,
    ):
        arrivals: list[tuple[float, bytes]] = []
        async with aiohttp.ClientSession() as session:
            start = time.monotonic()
            async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/event-stream")
                async for line in resp.content:
                    if line.startswith(b"data: "):
                        arrivals.append((time.monotonic() - start, line.strip()))
    assert arrivals[-1][1] == b"data: [DONE]"
    total = arrivals[-1][0]
    first = arrivals[0][0]
    assert len(arrivals) >= MAX_TOKENS
    assert total >= 0.75 * MAX_TOKENS / TOKENS_PER_SECOND  # the stream really took its time
    # unbuffered: the first event long before the end, and the rest spread over the stream
    assert first < 0.25 * total, (first, total)
    halfway = sum(1 for t, _ in arrivals if t < total / 2)
    assert MAX_TOKENS // 4 <= halfway <= len(arrivals) - MAX_TOKENS // 4, (halfway, arrivals)


async def test_nginx_keeps_a_principal_on_one_replica_and_fails_over_safely(
    tmp_path: Path,
) -> None:
    keys = [f"sk-test-{i:02d}" for i in range(16)]
    chat = {"model": "fake", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    with (
        two_replicas(tmp_path) as (a, b),
        nginx_running(tmp_path, [upstream(a), upstream(b)]) as url,
    ):
        async with aiohttp.ClientSession() as session:
            for key in keys:
                for n in range(3):
                    headers = {"Authorization": f"Bearer {key}", "X-Request-Id": f"{key}-{n}"}
                    async with session.get(f"{url}/v1/models", headers=headers) as resp:
                        assert resp.status == 200
            served = access_log(tmp_path, (f"{key}-{n}" for key in keys for n in range(3)))
            by_key: dict[str, set[str]] = defaultdict(set)
            for request_id, address in served.items():
                if request_id.startswith("sk-test-"):  # not nginx_running's /health check
                    by_key[request_id.rsplit("-", 1)[0]].add(address)
            assert sorted(by_key) == keys
            assert all(len(addresses) == 1 for addresses in by_key.values()), by_key
            used = set().union(*by_key.values())
            assert used == {upstream(a), upstream(b)}  # both replicas take principals
            # replica a stops: nginx could not connect, so it sends each request, POSTs too,
            # to b once, and every one is answered
            assert a.terminate() == 0
            for key in keys:
                headers = {"Authorization": f"Bearer {key}", "X-Request-Id": f"{key}-post"}
                async with session.post(f"{url}/v1/chat/completions", json=chat,
                                        headers=headers) as resp:  # fmt: skip
                    assert resp.status == 200, await resp.text()
                    assert (await resp.json())["object"] == "chat.completion"
            served = access_log(tmp_path, (f"{key}-post" for key in keys))
            tried = [served[f"{key}-post"].split(", ") for key in keys]
            assert {attempts[-1] for attempts in tried} == {upstream(b)}
            # a's principals were tried on a first (refused), then on b: one retry, no more
            assert [upstream(a), upstream(b)] in tried
            assert all(len(attempts) <= 2 for attempts in tried)


async def test_200_concurrent_clients_through_nginx_never_overspend_a_tier(tmp_path: Path) -> None:
    """Two replicas sharing one Redis for keys and limits, behind the shipped nginx config:
    four keys of a 30-requests-per-minute tier, 50 concurrent clients each."""
    import asyncio
    import sys

    from tests.support.redis_server import start_or_skip

    redis = start_or_skip(tmp_path / "redis")
    try:
        config = {
            **FAKE,
            "auth": {"enabled": True, "keys": redis.url + "?key_prefix=keys:"},
            "limits": {"store": redis.url, "default_tier": "t",
                       "tiers": {"t": {"requests_per_minute": 30}}},
            "queue": {"max_depth": 256},  # the test is about limits, not admission
        }  # fmt: skip
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        with (
            llmserve_up(tmp_path / "a", config) as a,
            llmserve_up(tmp_path / "b", config) as b,
            nginx_running(tmp_path, [upstream(a), upstream(b)]) as url,
        ):
            config_file = next((tmp_path / "a").glob("llmserve-*.yaml"))
            keys = []
            for i in range(4):
                made = subprocess.run(
                    [sys.executable, "-m", "llmserve", "keys", "create", "--name", f"k{i}",
                     "-c", str(config_file)], capture_output=True, text=True, check=True,
                )  # fmt: skip
                keys.append(next(w for w in made.stdout.split() if w.startswith("sk-llms-")))
            chat = {"model": "fake", "max_tokens": 2,
                    "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip

            async def one(session: aiohttp.ClientSession, key: str) -> tuple[str, int]:
                headers = {"Authorization": f"Bearer {key}"}
                async with session.post(f"{url}/v1/chat/completions", json=chat,
                                        headers=headers) as resp:  # fmt: skip
                    await resp.read()
                    return key, resp.status

            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector) as session:
                results = await asyncio.gather(*(one(session, key) for key in keys * 50))
        served = {key: sum(1 for k, s in results if k == key and s == 200) for key in keys}
        statuses = {s for _, s in results}
        assert statuses <= {200, 429}, statuses
        assert served == dict.fromkeys(keys, 30)  # each key its quota exactly, never more
    finally:
        redis.stop()
