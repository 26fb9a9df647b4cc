"""Gateway overhead: llmserve on the fake engine against a bare aiohttp server that calls the same
fake engine directly (no auth, limits, queue, metrics). Each server runs in its own process pinned
to CPU 0; this load generator runs pinned to CPU 1. The difference of the two latency
distributions, measured in one run, is what the gateway adds.

    .venv/bin/python benchmarks/gateway.py [--rate 1000] [--seconds 10] [--store memory|redis]
        [--tps 20] [--streams 1 64 512]

Prints a table: requests/s achieved, p50/p99 latency of each server and their difference; SSE
events/s of one stream at full speed; and rejection throughput (401, 429, 503).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.process import free_port, kill_group, wait_http  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

BARE_SERVER = """
import asyncio, gc, json, sys
gc.set_threshold(1_000_000, 10, 10)  # the garbage-collector settings llmserve serves with
try:  # the same event loop as llmserve (server.event_loop: auto)
    import uvloop
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
except ImportError:
    pass
from aiohttp import web
from llmserve.engine.fake import FakeEngine
from llmserve.engine.base import SamplingOptions
engine = FakeEngine("fake", 4096, tokens_per_second=float(sys.argv[2]))

REFUSAL = json.dumps({"error": {"message": "Incorrect API key provided.",
    "type": "authentication_error", "param": None, "code": "invalid_api_key"}}).encode()

async def chat(request):
    if request.headers.get("Authorization") == "Bearer sk-llms-nope":  # the floor for a 401
        return web.Response(body=REFUSAL, status=401, content_type="application/json")
    body = await request.json()
    prompt = await engine.render_chat(body["messages"])
    options = SamplingOptions(max_tokens=body["max_tokens"])
    if body.get("stream"):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        async for d in engine.generate(prompt, options, "r"):
            payload = {"choices": [{"index": 0, "delta": {"content": d.text}}]}
            await response.write(b"data: " + json.dumps(payload).encode() + b"\\n\\n")
        await response.write(b"data: [DONE]\\n\\n")
        return response
    text, n = [], 0
    async for d in engine.generate(prompt, options, "r"):
        text.append(d.text); n += d.num_tokens
    return web.json_response({"choices": [{"message": {"content": "".join(text)}}],
                              "usage": {"completion_tokens": n}})

async def collect_every_minute():
    while True:
        await asyncio.sleep(60)
        gc.collect()

async def start(app):
    await engine.start()
    gc.collect()
    gc.freeze()
    app["collector"] = asyncio.create_task(collect_every_minute())

app = web.Application()
app.router.add_post("/v1/chat/completions", chat)
app.router.add_get("/health", lambda r: web.json_response({"status": "ok"}))
app.on_startup.append(start)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


NO_KEY = {"Authorization": "Bearer sk-llms-nope"}
SSE_EVENTS = 90_000  # one stream at full speed (CPU time is counted in 10 ms ticks)


def llmserve_config(tmp: Path, port: int, store: str, tps: float) -> Path:
    config = {
        "server": {"host": "127.0.0.1", "port": port},
        "engine": {"kind": "fake", "served_model_name": "fake", "max_model_len": 100000,
                   "fake": {"tokens_per_second": tps}},
        "auth": {"enabled": True, "keys": str(tmp / "keys")},
        "limits": {"store": store, "state_dir": str(tmp / "limits"), "default_tier": "bench",
                   "tiers": {"bench": {"requests_per_minute": 10_000_000,
                                       "tokens_per_minute": 1_000_000_000},
                             "tiny": {"requests_per_minute": 1}}},
        "queue": {"max_depth": 10000, "max_concurrency": 10000},
        "usage": {"ledger": str(tmp / "usage.jsonl")},
        "logging": {"level": "warning", "access_log": False},
    }  # fmt: skip
    path = tmp / "bench.yaml"
    path.write_text(json.dumps(config))
    return path


def create_key(config: Path, tier: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "llmserve", "keys", "create", "--name", f"bench-{tier}",
         "--tier", tier, "-c", str(config)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return next(w for w in out.stdout.split() if w.startswith("sk-"))


@contextlib.contextmanager
def server(cmd: list[str], port: int):
    proc = subprocess.Popen(["taskset", "-c", "0", *cmd], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 60, proc)
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        kill_group(proc)


async def open_loop(url: str, headers: dict[str, str], rate: float, seconds: float,
                    body: dict) -> tuple[list[float], dict[int, int]]:  # fmt: skip
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> None:
            start = time.perf_counter()
            async with session.post(url, json=body, headers=headers) as resp:
                await resp.read()
            latencies.append(time.perf_counter() - start)
            statuses[resp.status] = statuses.get(resp.status, 0) + 1

        tasks = []
        begin = time.perf_counter()
        total = int(rate * seconds)
        for i in range(total):
            delay = begin + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return latencies, statuses


async def closed_loop(url: str, headers: dict[str, str], concurrency: int, seconds: float,
                      body: dict) -> tuple[int, dict[int, int]]:  # fmt: skip
    statuses: dict[int, int] = {}
    stop = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def worker() -> None:
            while time.perf_counter() < stop:
                async with session.post(url, json=body, headers=headers) as resp:
                    await resp.read()
                statuses[resp.status] = statuses.get(resp.status, 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sum(statuses.values()), statuses


async def stream_events(url: str, headers: dict[str, str], tokens: int) -> float:
    body = {"model": "fake", "messages": [{"role": "user", "content": "x"}],
            "max_tokens": tokens, "stream": True}  # fmt: skip
    async with aiohttp.ClientSession() as session:
        start = time.perf_counter()
        events = 0
        async with session.post(url, json=body, headers=headers) as resp:
            async for line in resp.content:
                if line.startswith(b"data:"):
                    events += 1
        return events / (time.perf_counter() - start)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process: robust to other load on the machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measured(pid: int, load) -> tuple[object, float]:
    before = cpu_seconds(pid)
    result = await load
    return result, cpu_seconds(pid) - before


async def stream_ttfts(url: str, headers: dict[str, str], concurrency: int,
                       seconds: float, tps: float) -> list[float]:  # fmt: skip
    """Closed loop of `concurrency` streams: time to the first content event. Streams are 32
    tokens long, except a lone stream: 2 tokens, so that it gives ~200 samples in 10 s instead
    of 6 (its TTFT does not depend on the length).

    The workers start spread over one stream's duration, as the streams of a steady load are: had
    they all started at once, every stream would end, and its successor arrive, in the same
    instant, and the last of each burst of `concurrency` new requests would wait for all the
    others to be admitted (a burst benchmark, not a steady one)."""
    tokens = 2 if concurrency == 1 else 32
    stream_seconds = tokens / tps
    body = {"model": "fake", "messages": [{"role": "user", "content": "x"}],
            "max_tokens": tokens, "stream": True}  # fmt: skip
    ttfts: list[float] = []
    stop = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def worker(index: int) -> None:
            await asyncio.sleep(stream_seconds * index / concurrency)
            while time.perf_counter() < stop:
                start = time.perf_counter()
                first = None
                async with session.post(url, json=body, headers=headers) as resp:
                    async for line in resp.content:
                        if first is None and _has_content(line):
                            first = time.perf_counter() - start
                if first is not None:
                    ttfts.append(first)

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return ttfts


def _has_content(line: bytes) -> bool:
    if not line.startswith(b"data: {"):
        return False
    choices = json.loads(line[6:]).get("choices") or [{}]
    return bool(choices[0].get("delta", {}).get("content"))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] * 1000


async def run(args: argparse.Namespace) -> None:
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        bare_port, serve_port = free_port(), free_port()
        config = llmserve_config(tmp, serve_port, args.store, args.tps)
        key = create_key(config, "bench")
        tiny_key = create_key(config, "tiny")
        auth = {"Authorization": f"Bearer {key}"}
        results, cpu, streams = {}, {}, {}
        bare_command = [sys.executable, "-c", BARE_SERVER, str(bare_port), str(args.tps)]
        with server(bare_command, bare_port) as (bare, pid):
            chat = bare + "/v1/chat/completions"
            await open_loop(chat, {}, args.rate, 1, body)  # warm up
            results["bare"], cpu["bare"] = await measured(
                pid, open_loop(chat, {}, args.rate, args.seconds, body)
            )
            for c in args.streams:
                streams[("bare", c)] = await stream_ttfts(chat, {}, c, args.seconds, args.tps)
            bare_refusals = await measured(pid, closed_loop(chat, NO_KEY, 64, 3, body))
        command = [sys.executable, "-m", "llmserve", "up", "-c", str(config)]
        with server(command, serve_port) as (url, pid):
            chat = url + "/v1/chat/completions"
            await open_loop(chat, auth, args.rate, 1, body)  # warm up
            results["llmserve"], cpu["llmserve"] = await measured(
                pid, open_loop(chat, auth, args.rate, args.seconds, body)
            )
            for c in args.streams:
                streams[("llmserve", c)] = await stream_ttfts(chat, auth, c, args.seconds, args.tps)
            rejections = {}
            for code, headers in (("401", NO_KEY),
                                  ("429", {"Authorization": f"Bearer {tiny_key}"})):  # fmt: skip
                rejections[code] = await measured(pid, closed_loop(chat, headers, 64, 3, body))
        fast_port = free_port()
        fast = llmserve_config(tmp, fast_port, args.store, 0)
        with server([sys.executable, "-m", "llmserve", "up", "-c", str(fast)],
                    fast_port) as (url, pid):  # fmt: skip
            chat = url + "/v1/chat/completions"
            events, events_cpu = await measured(pid, stream_events(chat, auth, SSE_EVENTS))
    print(f"machine: {os.cpu_count()} CPUs; servers pinned to CPU 0, load generator to CPU 1")
    print(f"open loop at {args.rate:.0f} req/s for {args.seconds:.0f}s, non-streaming, "
          f"max_tokens=8 at {args.tps:.0f} tokens/s, limiter store {args.store}")  # fmt: skip
    print(f"{'server':<10} {'done':>7} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>10}  statuses")
    for name, (lat, statuses) in results.items():
        per_request = cpu[name] / max(1, len(lat)) * 1e6
        print(f"{name:<10} {len(lat):>7} {pct(lat, 50):>8.3f} {pct(lat, 99):>8.3f} "
              f"{per_request:>10.0f}  {statuses}")  # fmt: skip
    (bare_lat, _), (ours, _) = results["bare"], results["llmserve"]
    print(
        f"added by the gateway: p50 {pct(ours, 50) - pct(bare_lat, 50):+.3f} ms, "
        f"p99 {pct(ours, 99) - pct(bare_lat, 99):+.3f} ms, CPU "
        f"{(cpu['llmserve'] / len(ours) - cpu['bare'] / len(bare_lat)) * 1e6:+.0f} us/request"
    )
    print(f"streams ({args.tps:.0f} tokens/s each, 32 tokens; a lone stream 2): time to first "
          "token, ms")  # fmt: skip
    print(f"{'concurrency':>11} {'bare p50':>9} {'bare p99':>9} {'ours p50':>9} {'ours p99':>9}"
          f" {'added p99 ms':>12}")  # fmt: skip
    for c in args.streams:
        b, o = streams[("bare", c)], streams[("llmserve", c)]
        print(f"{c:>11} {pct(b, 50):>9.2f} {pct(b, 99):>9.2f} {pct(o, 50):>9.2f} "
              f"{pct(o, 99):>9.2f} {pct(o, 99) - pct(b, 99):>+12.2f}"
              f"  n={len(b)}/{len(o)}")  # fmt: skip
    print(
        f"SSE: one stream at full speed: {events:,.0f} events/s wall, "
        f"{SSE_EVENTS / max(events_cpu, 1e-9):,.0f} events per CPU-second of the server"
    )
    print("rejections: wall rate (limited by this load generator on one core), and the server's "
          "capacity (requests per CPU-second)")  # fmt: skip
    rejections["401 bare"] = bare_refusals
    for code, ((count, statuses), used) in rejections.items():
        print(f"rejections {code}: {count / 3:,.0f}/s wall, {count / max(used, 1e-9):,.0f} per "
              f"CPU-second of the server  {statuses}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--store", default="memory", choices=["memory", "redis"])
    parser.add_argument("--tps", type=float, default=20, help="fake engine tokens/s per request")
    parser.add_argument("--streams", type=int, nargs="*", default=[1, 64, 512])
    args = parser.parse_args()
    gc.disable()  # the load generator's own collections would show up as server latency
    if args.store == "memory":
        args.store = "memory://"
        asyncio.run(run(args))
        return
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer.start_new(Path(tmp))
        try:
            args.store = redis.url
            asyncio.run(run(args))
        finally:
            redis.stop()


if __name__ == "__main__":
    main()
