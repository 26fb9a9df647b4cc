"""Cost of `Metrics.observe` per request and of `Metrics.render` with about 1,000 series.

Run: .venv/bin/python benchmarks/metrics.py [--principals 300] [--renders 500]
"""

from __future__ import annotations

import argparse
import statistics
import time

from prometheus_client import CollectorRegistry

from llmserve.config import MetricsConfig
from llmserve.engine.base import EngineStats
from llmserve.metrics import Metrics
from llmserve.records import RequestRecord


def streamed(i: int, principal: str, gaps: int) -> RequestRecord:
    return RequestRecord(
        request_id=f"r{i}", route="chat", started_at=0.0, principal_id=principal, tier="pro",
        model="m", stream=True, status=200, prompt_tokens=128, completion_tokens=gaps + 1,
        finish_reason="length", queue_wait_seconds=0.002, ttft_seconds=0.05, total_seconds=1.0,
        engine_seconds=0.997, inter_token_seconds=[0.015 + (j % 7) * 0.001 for j in range(gaps)],
    )  # fmt: skip


def rejected(i: int, principal: str) -> RequestRecord:
    return RequestRecord(
        request_id=f"x{i}", route="chat", started_at=0.0, principal_id=principal, tier="free",
        status=429, error_code="rate_limit_exceeded", rejected_by="tokens_per_minute",
        total_seconds=0.0002,
    )  # fmt: skip


def per_call_us(func, records: list[RequestRecord]) -> float:
    start = time.perf_counter()
    for record in records:
        func(record)
    return (time.perf_counter() - start) / len(records) * 1e6


def bench_observe(n: int) -> None:
    metrics = Metrics(CollectorRegistry(), MetricsConfig(), include_default_registry=False)
    for label, make in (
        ("429 rejection (no tokens)", lambda i: rejected(i, f"key_{i % 50}")),
        ("stream, 64 tokens", lambda i: streamed(i, f"key_{i % 50}", 63)),
        ("stream, 512 tokens", lambda i: streamed(i, f"key_{i % 50}", 511)),
    ):
        records = [make(i) for i in range(n)]
        runs = [per_call_us(metrics.observe, records) for _ in range(5)]
        print(f"observe, {label:<28} {statistics.median(runs):6.2f} µs/request (median of 5x{n})")


def bench_render(principals: int, renders: int, include_default: bool) -> None:
    metrics = Metrics(
        CollectorRegistry(), MetricsConfig(), include_default_registry=include_default
    )
    metrics.bind(queue_depth=lambda: 3, in_flight=lambda: 8, concurrency_limit=lambda: 16,
                 queue_limit=lambda: 64, engine_healthy=lambda: True, model="m",
                 engine_stats=lambda: EngineStats(0.4, 8, 0))  # fmt: skip
    for i in range(principals):
        metrics.observe(streamed(i, f"key_{i}", 8))
        metrics.observe(rejected(i, f"key_{i}"))
        metrics.observe(RequestRecord(f"e{i}", "completions", 0.0, status=503,
                                      error_code="server_overloaded"))  # fmt: skip
    body = metrics.render()[0]
    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    times = []
    for _ in range(renders):
        start = time.perf_counter()
        metrics.render()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    p99 = times[int(len(times) * 0.99) - 1]
    where = "+ default REGISTRY" if include_default else "own registry only"
    print(f"render, {series} series ({len(body) / 1024:.0f} KiB, {where}): "
          f"median {statistics.median(times):.2f} ms, p99 {p99:.2f} ms")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--principals", type=int, default=300)
    parser.add_argument("--renders", type=int, default=500)
    parser.add_argument("--records", type=int, default=20_000)
    args = parser.parse_args()
    bench_observe(args.records)
    bench_render(args.principals, args.renders, include_default=False)
    bench_render(args.principals, args.renders, include_default=True)
    bench_render(1000, 200, include_default=True)  # the default per-key cap reached


if __name__ == "__main__":
    main()
