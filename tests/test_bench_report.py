"""The result JSON keys and console labels of `llmserve bench` are vLLM's; the sweep logic."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from llmserve.bench import report
from llmserve.bench.records import RequestResult
from llmserve.bench.sweep import SweepStep, best_rate, stop_reason, sweep


def settings(**overrides: object) -> report.RunSettings:
    values: dict[str, object] = {
        "model_id": "org/smol",
        "endpoint": "/v1/completions",
        "num_prompts": 2,
        "request_rate": float("inf"),
        "burstiness": 1.0,
        "max_concurrency": None,
        "percentile_metrics": ("ttft", "tpot", "itl"),
        "percentiles": (99.0,),
        "date": "20260101-000000",
    }
    values.update(overrides)
    return report.RunSettings(**values)  # type: ignore[arg-type]


def results() -> list[RequestResult]:
    good = RequestResult(
        index=0,
        prompt_len=5,
        success=True,
        status=200,
        output_tokens=3,
        ttft=0.1,
        itl=[0.05, 0.05],
        latency=0.2,
    )
    bad = RequestResult(index=1, prompt_len=5, status=429, error_code="rate_limit_exceeded")
    return [good, bad]


def test_result_has_vllm_keys_and_drops_detail_unless_asked() -> None:
    result = report.build_result(settings(), results(), duration=1.0)
    for key in (
        "date", "endpoint_type", "backend", "label", "model_id", "tokenizer_id", "num_prompts",
        "request_rate", "burstiness", "max_concurrency", "duration", "completed", "failed",
        "total_input_tokens", "total_output_tokens", "request_throughput", "request_goodput",
        "output_throughput", "total_token_throughput", "latencies", "queue_times",
        "max_output_tokens_per_s", "max_concurrent_requests", "rtfx",
        "mean_ttft_ms", "median_ttft_ms", "std_ttft_ms", "p99_ttft_ms",
        "mean_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "p99_itl_ms",
    ):  # fmt: skip
        assert key in result, key
    assert "mean_e2el_ms" not in result  # not in --percentile-metrics
    assert "ttfts" not in result and "errors" not in result
    assert result["request_rate"] == "inf" and result["backend"] == "openai"
    assert result["request_goodput"] is None
    assert result["median_tpot_ms"] == pytest.approx(50.0)
    assert result["llmserve"]["status_counts"] == {"200": 1, "429": 1}
    detailed = report.build_result(settings(), results(), duration=1.0, detailed=True)
    assert detailed["output_lens"] == [3, 0]
    assert detailed["errors"][0] == "" and "rate_limit_exceeded" in detailed["errors"][1]


def test_client_queue_metrics_only_with_max_concurrency_and_when_selected() -> None:
    chosen = ("ttft", "client_queue_time", "e2el_including_client_queue")
    with_limit = settings(max_concurrency=4, request_rate=5.0, percentile_metrics=chosen)
    result = report.build_result(with_limit, results(), duration=1.0)
    assert "p99_client_queue_time_ms" in result
    assert "mean_e2el_including_client_queue_ms" in result
    unlimited = report.build_result(settings(percentile_metrics=chosen), results(), 1.0)
    assert "mean_client_queue_time_ms" not in unlimited


def vllm_line(label: str, value: str) -> str:
    """vLLM prints `"{:<40} {:<10}"`."""
    return label.ljust(40) + " " + value.ljust(10)


def test_console_uses_vllm_labels_and_layout() -> None:
    chosen = ("ttft", "tpot", "itl", "e2el")
    s = settings(max_concurrency=8, percentile_metrics=chosen, percentiles=(50.0, 99.9))
    text = report.format_console(report.build_result(s, results(), duration=2.0))
    lines = text.splitlines()
    assert lines[0] == "=" * 12 + " Serving Benchmark Result " + "=" * 12
    assert vllm_line("Successful requests:", "1") in lines
    assert vllm_line("Maximum request concurrency:", "8") in lines
    assert vllm_line("Request throughput (req/s):", "0.50") in lines
    assert "Request rate configured (RPS):" not in text  # inf is not printed, as in vLLM
    assert "-" * 15 + "Time to First Token" + "-" * 16 in lines
    assert vllm_line("P99.9 TTFT (ms):", "100.00") in lines
    assert vllm_line("Median TPOT (ms):", "50.00") in lines
    assert vllm_line("P50 E2EL (ms):", "200.00") in lines
    assert "429:unknown:" in text


def test_result_path_follows_vllm_naming(tmp_path: Path) -> None:
    result = report.build_result(settings(max_concurrency=4, request_rate=2.0), results(), 1.0)
    path = report.result_path(result, result_dir=tmp_path)
    assert path == tmp_path / "openai-2.0qps-concurrency4-smol-20260101-000000.json"
    assert report.result_path(result, filename="x.json") == Path("x.json")


def step(
    rate: float, goodput: float, failed: int = 0, throughput: float | None = None
) -> SweepStep:
    return SweepStep(rate, 10, failed, throughput or goodput, goodput, {})


def test_sweep_stops_when_goodput_plateaus_or_errors_appear() -> None:
    assert stop_reason([step(1, 1.0)]) is None
    assert stop_reason([step(1, 1.0), step(2, 2.0)]) is None
    assert "stopped rising" in (stop_reason([step(1, 2.0), step(2, 2.04)]) or "")
    assert "failed" in (stop_reason([step(1, 1.0), step(2, 2.0, failed=1)]) or "")


def test_best_rate_is_the_highest_rising_step_within_the_slo() -> None:
    steps = [
        step(1, 1.0),
        step(2, 2.0),
        step(4, 2.8, throughput=4.0),  # rose, but only 70% of requests were good
        step(8, 2.9, throughput=3.0),  # 97% good, but goodput barely rose: saturated
        step(16, 6.0, failed=2),  # failures
    ]
    assert best_rate(steps, min_good_fraction=0.9) == 2
    assert best_rate(steps, min_good_fraction=0.5) == 4
    assert best_rate([step(1, 0.0, throughput=1.0)], 0.9) is None


async def test_sweep_drives_rates_up_by_the_factor() -> None:
    seen: list[float] = []

    async def run(rate: float) -> SweepStep:
        seen.append(rate)
        return step(rate, min(rate, 3.0))  # saturates at 3 req/s

    outcome = await sweep(run, start_rate=1, factor=2, max_steps=10, min_good_fraction=0.9)
    assert seen == [1, 2, 4, 8]  # 4 -> 3.0 still rises; 8 -> 3.0 does not
    assert outcome.best_rate == 4  # the last step whose goodput still rose
    assert "stopped rising" in outcome.stop_reason
    await asyncio.sleep(0)
