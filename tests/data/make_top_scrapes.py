"""Regenerate top_scrape_1.txt / top_scrape_2.txt: two /metrics texts of one server, 2 s apart.

Run: .venv/bin/python tests/data/make_top_scrapes.py. The numbers are chosen so the dashboard's
rates and percentiles are easy to check by hand (see tests/test_top_view.py).
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from llmserve.config import MetricsConfig
from llmserve.engine.base import EngineStats
from llmserve.metrics import Metrics
from llmserve.records import RequestRecord

HERE = Path(__file__).parent
START = 1_700_000_000.0
VLLM_LINES = (
    "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
    "# TYPE vllm:num_requests_running gauge\n"
    'vllm:num_requests_running{engine="0",model_name="smollm2"} 12.0\n'
)


def record(i: int, **kw: object) -> RequestRecord:
    base = dict(request_id=f"r{i}", route="chat", started_at=START, status=200, tier="pro")
    return RequestRecord(**{**base, **kw})  # type: ignore[arg-type]


def first_window(m: Metrics) -> None:
    for i in range(100):  # 100 chat requests, slow TTFT (2 s): must not leak into the deltas
        m.observe(
            record(
                i,
                principal_id="alice",
                root_model="smollm2",
                prompt_tokens=20,
                completion_tokens=30,
                ttft_seconds=2.0,
                total_seconds=3.0,
                engine_seconds=2.9,
                queue_wait_seconds=0.05,
                inter_token_seconds=[0.02] * 4,
            )
        )
    for i in range(50):
        m.observe(
            record(
                1000 + i,
                principal_id="bob",
                root_model="smollm2-lora-a",
                prompt_tokens=10,
                completion_tokens=30,
                ttft_seconds=2.0,
                total_seconds=3.0,
                engine_seconds=2.9,
            )
        )
    m.observe(
        record(
            2000,
            status=429,
            error_code="rate_limit_exceeded",
            rejected_by="tokens_per_minute",
            principal_id="carol",
        )
    )
    m.observe(record(2001, status=503, error_code="server_overloaded", principal_id="carol"))
    m.observe(record(2002, status=500, error_code="engine_error", principal_id="carol"))


def second_window(m: Metrics) -> None:
    # 20 chat + 4 completions in 2 s = 12.0 requests/s; 1,640 completion tokens = 820/s.
    for i in range(10):
        m.observe(
            record(
                3000 + i,
                principal_id="alice",
                root_model="smollm2",
                prompt_tokens=20,
                completion_tokens=100,
                ttft_seconds=0.04,
                total_seconds=1.0,
                engine_seconds=0.9995,
                queue_wait_seconds=0.0,
                inter_token_seconds=[0.01] * 9,
            )
        )
    for i in range(10):
        m.observe(
            record(
                3100 + i,
                principal_id="bob",
                root_model="smollm2-lora-a",
                prompt_tokens=16,
                completion_tokens=60,
                ttft_seconds=0.4,
                total_seconds=1.0,
                engine_seconds=0.9995,
                queue_wait_seconds=0.0,
            )
        )
    for i in range(4):
        m.observe(
            record(
                3200 + i,
                route="completions",
                principal_id="dave",
                root_model="smollm2",
                prompt_tokens=1,
                completion_tokens=10,
                ttft_seconds=0.4,
                total_seconds=0.5,
                engine_seconds=0.4995,
            )
        )
    for i in range(4):
        m.observe(
            record(
                3300 + i,
                status=429,
                error_code="rate_limit_exceeded",
                rejected_by="tokens_per_minute",
                principal_id="carol",
            )
        )
    for i in range(3):
        m.observe(record(3400 + i, status=503, error_code="queue_timeout", principal_id="carol"))
    m.observe(record(3500, status=500, error_code="engine_error", principal_id="carol"))


def main() -> None:
    m = Metrics(
        CollectorRegistry(),
        MetricsConfig(),
        include_default_registry=False,
        gpu_probe=_NoGpu(),
        time_func=lambda: START,
    )
    m.bind(
        queue_depth=lambda: 5,
        in_flight=lambda: 12,
        concurrency_limit=lambda: 16,
        queue_limit=lambda: 64,
        engine_healthy=lambda: True,
        model="smollm2",
        engine_stats=lambda: EngineStats(kv_cache_usage=0.85, running=12, waiting=1),
    )
    first_window(m)
    (HERE / "top_scrape_1.txt").write_bytes(m.render()[0] + VLLM_LINES.encode())
    second_window(m)
    (HERE / "top_scrape_2.txt").write_bytes(m.render()[0] + VLLM_LINES.encode())


class _NoGpu:
    def sample(self) -> list:
        return []


if __name__ == "__main__":
    main()
