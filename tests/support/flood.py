"""Huge invalid request bodies, and clients that send them back to back while /health is timed
(tests/test_server_huge_bodies.py, benchmarks/body_flood.py)."""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

MAX_BODY = 4 * 1024 * 1024  # server.max_body_bytes' default

# body kind -> (error code, a fragment of the message: the limit it names)
EXPECTED = {
    "ints": ("request_too_complex", "server.max_json_values"),
    "roles": ("request_too_complex", "server.max_json_values"),
    "stop": ("request_too_complex", "server.max_json_values"),
    "lists": ("request_too_complex", "server.max_json_values"),
    "deep": ("request_too_complex", "server.max_json_values"),
    "messages": ("array_above_max_length", "server.max_messages"),
    "nested": ("request_too_complex", "server.max_json_depth"),
    "budget": ("invalid_request", "messages[2047].role"),
}
KINDS = tuple(EXPECTED)


def invalid_body(kind: str, limit: int = MAX_BODY) -> bytes:
    """A chat request body that fails validation: the largest ones are just under `limit`.

    ints      "messages": [1, 1, ...]                  two million items that are not objects
    roles     "messages": [{"role": "x", ...}, ...]    140,000 messages with a bad role
    stop      one message, "stop": [1, 1, ...]         two million items that are not strings
    lists     "messages": [[], [], ...]                1.4 million empty arrays
    deep      content [[[...]]], two million levels deep
    messages  2,049 good messages (one over server.max_messages)
    nested    content nested 65 levels deep (one over server.max_json_depth)
    budget    every count just within its limit (61,000 values: 2,048 messages of 9 text parts),
              the last message's role bad: the most validation work a body can ask for
    """
    head = '{"model": "fake", "messages": ['
    if kind == "ints":
        return _fill(head, "1", "]}", limit)
    if kind == "roles":
        return _fill(head, '{"role": "x", "content": "x"}', "]}", limit)
    if kind == "stop":
        return _fill(head + '{"role": "user", "content": "x"}], "stop": [', "1", "]}", limit)
    if kind == "lists":
        return _fill(head, "[]", "]}", limit)
    if kind == "deep":
        head += '{"role": "user", "content": '
        depth = (limit - 1 - len(head) - 3) // 2
        return (head + "[" * depth + "]" * depth + "}]}").encode()
    if kind == "messages":
        return (head + ", ".join(['{"role": "user", "content": "x"}'] * 2049) + "]}").encode()
    if kind == "nested":
        return (head + '{"role": "user", "content": ' + "[" * 62 + "]" * 62 + "}]}").encode()
    if kind == "budget":
        parts = ", ".join(['{"type": "text", "text": "x"}'] * 9)
        message = '{"role": "user", "content": [' + parts + "]}"
        last = message.replace('"user"', '"x"')
        return (head + ", ".join([message] * 2047 + [last]) + "]}").encode()
    raise ValueError(f"unknown body kind {kind!r}")


def _fill(head: str, item: str, tail: str, limit: int) -> bytes:
    count = (limit - 1 - len(head) - len(tail) + 2) // (len(item) + 2)
    body = (head + ", ".join([item] * count) + tail).encode()
    assert len(body) < limit, len(body)
    return body


# Run as `python -c ATTACKER URL SECONDS CLIENTS FILE...`: CLIENTS clients post the bodies in
# the files, in turn, back to back, for SECONDS; prints one JSON line: per body kind (the file's
# stem), the count of each (status, code, whether the message named the expected fragment).
ATTACKER = """
import asyncio, json, sys, time
from collections import Counter
from pathlib import Path
import aiohttp
url, seconds, clients = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
files = [Path(p) for p in sys.argv[4:]]
bodies = [(f.stem, f.read_bytes()) for f in files]
fragments = json.loads(files[0].with_name("expected.json").read_text())

async def main():
    seen, slowest = Counter(), 0.0
    end = time.monotonic() + seconds
    async with aiohttp.ClientSession(headers={"Content-Type": "application/json"}) as session:
        async def client(i):
            nonlocal slowest
            n = i
            while time.monotonic() < end:
                kind, body = bodies[n % len(bodies)]
                n += 1
                started = time.monotonic()
                async with session.post(url, data=body) as resp:
                    error = (await resp.json(content_type=None))["error"]
                slowest = max(slowest, time.monotonic() - started)
                named = fragments[kind] in error["message"]
                seen[json.dumps([kind, resp.status, error["code"], named])] += 1
        await asyncio.gather(*(client(i) for i in range(clients)))
    print(json.dumps({"seen": seen, "slowest": slowest}))

asyncio.run(main())
"""


def write_bodies(directory: Path, kinds: tuple[str, ...] | list[str]) -> list[Path]:
    paths = []
    for kind in kinds:
        path = directory / f"{kind}.json"
        path.write_bytes(invalid_body(kind))
        paths.append(path)
    expected = {kind: fragment for kind, (_, fragment) in EXPECTED.items()}
    (directory / "expected.json").write_text(json.dumps(expected))
    return paths


def start_attackers(
    url: str, seconds: float, clients: int, paths: list[Path]
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", ATTACKER, url, str(seconds), str(clients), *map(str, paths)],
        stdout=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip


async def poll_health(url: str, seconds: float) -> list[float]:
    """GET `url` one at a time on one keep-alive connection for `seconds`: the latencies."""
    latencies = []
    end = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        while time.monotonic() < end:
            started = time.perf_counter()
            async with session.get(url) as resp:
                await resp.read()
                assert resp.status == 200, resp.status
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0.005)
    return latencies


def summary(latencies: list[float]) -> str:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (f"n={len(ordered):5d}  p50={statistics.median(ordered) * 1000:7.1f} ms  "
            f"p99={p99 * 1000:7.1f} ms  max={ordered[-1] * 1000:7.1f} ms")  # fmt: skip
