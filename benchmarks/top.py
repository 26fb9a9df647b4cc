"""CPU used by `llmserve top` at a 1 s interval, in a real terminal (tmux), against a server
whose /metrics changes on every scrape (a Metrics object fed 50 requests between scrapes, plus
a block of 1,000 vllm-like lines that top must skip).

Run: .venv/bin/python benchmarks/top.py [--seconds 30] [--interval 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry

from llmserve.config import MetricsConfig
from llmserve.engine.base import EngineStats
from llmserve.metrics import Metrics
from llmserve.records import RequestRecord

ROOT = Path(__file__).parent.parent
VLLM_BLOCK = "".join(
    f'vllm:request_latency_seconds_bucket{{engine="0",le="{i}",model_name="m"}} {i * 3}.0\n'
    for i in range(1000)
).encode()


def live_metrics() -> Metrics:
    metrics = Metrics(CollectorRegistry(), MetricsConfig(), include_default_registry=False)
    metrics.bind(queue_depth=lambda: random.randint(0, 10), in_flight=lambda: 16,
                 concurrency_limit=lambda: 16, queue_limit=lambda: 64, model="bench",
                 engine_stats=lambda: EngineStats(random.random(), 16, 2))  # fmt: skip
    return metrics


def feed(metrics: Metrics, n: int) -> None:
    for i in range(n):
        metrics.observe(RequestRecord(
            f"r{i}", "chat", 0.0, principal_id=f"key_{i % 12}", tier="pro", status=200,
            prompt_tokens=100, completion_tokens=64, ttft_seconds=random.uniform(0.02, 0.5),
            total_seconds=1.0, engine_seconds=0.999, queue_wait_seconds=random.uniform(0, 0.1),
            inter_token_seconds=[random.uniform(0.01, 0.03) for _ in range(63)],
        ))  # fmt: skip


def serve(metrics: Metrics, ready: threading.Event, holder: dict) -> None:
    async def handle_metrics(request: web.Request) -> web.Response:
        feed(metrics, 50)
        return web.Response(body=metrics.render()[0] + VLLM_BLOCK, content_type="text/plain")

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/metrics", handle_metrics)
        app.router.add_get("/health", health)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        holder["url"] = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=1.0)
    args = parser.parse_args()
    ready, holder = threading.Event(), {}
    threading.Thread(target=serve, args=(live_metrics(), ready, holder), daemon=True).start()
    ready.wait(10)
    session = f"bench-top-{uuid.uuid4().hex[:6]}"
    command = (f"exec env -u COLUMNS -u LINES PYTHONPATH={ROOT} {sys.executable} -m llmserve top "
               f"{holder['url']} --interval {args.interval}")  # fmt: skip
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "40",
                    command], check=True)  # fmt: skip
    try:
        pid = int(subprocess.run(["tmux", "display", "-p", "-t", session, "#{pane_pid}"],
                                 capture_output=True, text=True, check=True).stdout)  # fmt: skip
        time.sleep(5)  # start-up (imports) is not the steady state
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(args.seconds)
        cpu1, t1 = cpu_seconds(pid), time.monotonic()
        screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                                capture_output=True, text=True).stdout  # fmt: skip
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)
    assert "model bench" in screen, screen
    share = (cpu1 - cpu0) / (t1 - t0) * 100
    print(f"llmserve top, interval {args.interval:g}s, {args.seconds:g}s measured: "
          f"{cpu1 - cpu0:.2f} CPU s = {share:.2f}% of one core")  # fmt: skip


if __name__ == "__main__":
    main()
