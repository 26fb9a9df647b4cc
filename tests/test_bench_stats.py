"""The statistics of `llmserve bench` as pure functions, against values computed by hand."""

from __future__ import annotations

import pytest

from llmserve.bench import stats
from llmserve.bench.records import RATE_LIMIT_HEADERS, RequestResult


def ok(
    ttft: float,
    itl: list[float],
    tokens: int | None,
    *,
    start: float = 0.0,
    prompt: int = 10,
) -> RequestResult:
    latency = ttft + sum(itl)
    return RequestResult(
        index=0,
        prompt_len=prompt,
        success=True,
        status=200,
        output_tokens=tokens,
        ttft=ttft,
        itl=itl,
        latency=latency,
        start_time=start,
    )


def failed(status: int, code: str | None, message: str = "", **headers: str) -> RequestResult:
    return RequestResult(
        index=0,
        prompt_len=10,
        status=status,
        error_code=code,
        error_message=message,
        headers={k.replace("_", "-"): v for k, v in headers.items()},
    )


def test_percentile_interpolates_linearly_between_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]  # sorted 1 2 3 4; rank = 3p/100
    assert stats.percentile(values, 50) == pytest.approx(2.5)
    assert stats.percentile(values, 90) == pytest.approx(3.7)  # rank 2.7: 3 + 0.7
    assert stats.percentile(values, 99) == pytest.approx(3.97)
    assert stats.percentile(values, 100) == 4.0
    assert stats.percentile([], 99) == 0.0
    assert stats.percentile([7.0], 99) == 7.0


def test_std_is_population_std() -> None:
    assert stats.std([1.0, 3.0]) == pytest.approx(1.0)
    assert stats.std([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]) == pytest.approx(2.0)


def test_tpot_leaves_out_first_token_and_one_token_requests() -> None:
    # A: ttft 0.1, then 4 chunks 0.05 apart -> e2el 0.3, 5 tokens -> (0.3-0.1)/4 = 0.05
    # B: one token only -> no TPOT (excluded from the TPOT list)
    # C: usage says 3 tokens over 2 chunks: (0.4-0.2)/(3-1) = 0.1
    results = [ok(0.1, [0.05] * 4, 5), ok(0.2, [], 1), ok(0.2, [0.2], 3)]
    metrics = stats.compute_metrics(results, duration=2.0, percentiles=[50])
    assert metrics.tpot.mean == pytest.approx(75.0)  # (50 + 100) / 2 ms
    assert metrics.tpot.median == pytest.approx(75.0)
    assert metrics.ttft.mean == pytest.approx(500 / 3)  # (100 + 200 + 200) / 3 ms
    # ITL pools every gap: 4 x 50 ms and 1 x 200 ms
    assert metrics.itl.mean == pytest.approx(80.0)
    assert metrics.itl.percentiles == ((50.0, pytest.approx(50.0)),)


def test_output_tokens_come_from_usage_else_from_chunks() -> None:
    assert stats.output_len(ok(0.1, [0.1, 0.1], 7)) == 7
    assert stats.output_len(ok(0.1, [0.1, 0.1], None)) == 3
    assert stats.output_len(failed(500, "engine_error")) == 0


def test_throughputs_count_only_successes() -> None:
    results = [ok(0.1, [0.1], 4, prompt=10), ok(0.1, [0.1], 6, prompt=30), failed(500, "x")]
    m = stats.compute_metrics(results, duration=4.0, percentiles=[99])
    assert (m.completed, m.failed) == (2, 1)
    assert (m.total_input, m.total_output) == (40, 10)
    assert m.request_throughput == pytest.approx(0.5)
    assert m.output_throughput == pytest.approx(2.5)
    assert m.total_token_throughput == pytest.approx(12.5)


def test_goodput_counts_requests_meeting_every_slo() -> None:
    results = [
        ok(0.1, [0.02] * 9, 10),  # ttft 100, tpot 20, e2el 280: good
        ok(0.3, [0.02] * 9, 10),  # ttft 300: bad
        ok(0.1, [0.05] * 9, 10),  # tpot 50: bad
        ok(0.1, [], 1),  # one token: tpot counts as 0, good
    ]
    slo = {"ttft": 200.0, "tpot": 30.0}
    m = stats.compute_metrics(results, duration=2.0, percentiles=[99], goodput_slo_ms=slo)
    assert m.request_goodput == pytest.approx(1.0)  # 2 good / 2 s
    only_e2el = stats.compute_metrics(results, 2.0, [99], goodput_slo_ms={"e2el": 300.0})
    assert only_e2el.request_goodput == pytest.approx(1.0)  # e2el 280, 480, 550, 100 ms


def test_parse_goodput_accepts_vllm_pairs_and_rejects_others() -> None:
    assert stats.parse_goodput(["ttft:200", "e2el:1500.5"]) == {"ttft": 200.0, "e2el": 1500.5}
    for bad in (["ttft"], ["itl:5"], ["tpot:x"], ["ttft:-1"]):
        with pytest.raises(ValueError):
            stats.parse_goodput(bad)


def test_peak_rates_bucket_chunks_and_requests_per_second() -> None:
    a = ok(0.5, [0.2, 0.2, 0.2], 4, start=0.0)  # chunks at 0.5 0.7 0.9 1.1 -> s0: 3, s1: 1
    b = ok(0.1, [0.1], 2, start=1.0)  # chunks at 1.1 1.2 -> s1: 2
    tokens, concurrency = stats.peak_rates([a, b])
    assert tokens == 3.0
    assert concurrency == 2  # both active during second 1


def test_status_breakdown_by_status_code_and_limit() -> None:
    results = [
        ok(0.1, [], 1),
        failed(401, "invalid_api_key"),
        failed(429, "rate_limit_exceeded", "Rate limit reached: tokens per minute (4000)"),
        failed(429, "rate_limit_exceeded", "requests_per_minute limit of 20 reached"),
        failed(429, "rate_limit_exceeded", "slow down"),
        failed(503, "queue_timeout"),
        failed(503, "server_overloaded"),
        failed(500, "engine_error"),
        failed(0, "connection_error"),
    ]
    extra = stats.llmserve_breakdown(results, [99])
    assert extra["status_counts"] == {
        "200": 1,
        "401": 1,
        "429": 3,
        "500": 1,
        "503": 2,
        "no_response": 1,
    }
    assert extra["error_counts"] == {
        "401:invalid_api_key": 1,
        "429:requests_per_minute": 1,
        "429:tokens_per_minute": 1,
        "429:unknown": 1,
        "500:engine_error": 1,
        "503:queue_timeout": 1,
        "503:server_overloaded": 1,
        "no_response:connection_error": 1,
    }
    assert extra["rate_limited_by"] == {
        "requests_per_minute": 1,
        "tokens_per_minute": 1,
        "unknown": 1,
    }
    assert extra["server_queue_wait_ms"] is None


def test_limit_is_read_from_param_before_message() -> None:
    r = failed(429, "rate_limit_exceeded", "limit reached")
    r.error_param = "tokens_per_day"
    assert stats.limit_hit(r) == "tokens_per_day"


def test_rejection_header_check_names_what_is_missing() -> None:
    full = {h.replace("-", "_"): "1" for h in RATE_LIMIT_HEADERS}
    requests_only = {h.replace("-", "_"): "1" for h in RATE_LIMIT_HEADERS[:3]}
    results = [
        failed(429, "rate_limit_exceeded", retry_after="3", **full),
        failed(429, "rate_limit_exceeded", retry_after="3", **requests_only),  # fine
        failed(503, "server_overloaded", retry_after="1"),  # no x-ratelimit-*
        failed(429, "rate_limit_exceeded", **full),  # no Retry-After
        failed(401, "invalid_api_key"),  # not checked
    ]
    assert stats.header_check(results) == {
        "checked": 4,
        "missing_retry_after": 1,
        "missing_ratelimit_headers": 1,
        "ok": False,
    }
    assert stats.header_check(results[:2])["ok"] is True


def test_a_partial_rate_limit_trio_is_reported() -> None:
    partial = {h: "1" for h in RATE_LIMIT_HEADERS[:5]}  # tokens trio lacks its reset
    assert not stats.has_rate_limit_headers(partial)
    assert stats.has_rate_limit_headers({h: "1" for h in RATE_LIMIT_HEADERS[3:]})
    assert not stats.has_rate_limit_headers({})


def test_server_queue_wait_is_summarised_from_the_header() -> None:
    results = [ok(0.1, [], 1), ok(0.1, [], 1), ok(0.1, [], 1)]
    results[0].headers["x-queue-wait-ms"] = "10"
    results[1].headers["x-queue-wait-ms"] = "30"
    results[2].headers["x-queue-wait-ms"] = "garbage"
    wait = stats.llmserve_breakdown(results, [50])["server_queue_wait_ms"]
    assert wait == {
        "count": 2,
        "mean": pytest.approx(20.0),
        "median": pytest.approx(20.0),
        "std": pytest.approx(10.0),
        "p50": pytest.approx(20.0),
    }
