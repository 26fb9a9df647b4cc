"""The dashboard is a pure function of two recorded scrapes (tests/data/top_scrape_*.txt).

The two texts were rendered by llmserve.metrics 2 s apart (tests/data/make_top_scrapes.py).
Between them: 20 chat + 4 completions successes, 4x 429 (tokens_per_minute), 3x 503 and 1x 500,
so 32 generation requests in 2 s; 1,640 completion tokens; TTFT 10x 40 ms and 14x 400 ms.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from rich.console import Console

from llmserve.top.scrape import Scrape, parse_metrics
from llmserve.top.stats import History, histogram_quantile, summarize
from llmserve.top.view import ViewState, render_dashboard, render_scrapes, sparkline

DATA = Path(__file__).parent / "data"
START = 1_700_000_000.0


def recorded(n: int, at: float, healthy: bool = True) -> Scrape:
    text = (DATA / f"top_scrape_{n}.txt").read_text()
    return Scrape(at=at, wall=START + 3623 + at, samples=parse_metrics(text), healthy=healthy)


def text_of(renderable: object, width: int = 120) -> str:
    console = Console(record=True, width=width, color_system=None)
    console.print(renderable)
    return console.export_text()


@pytest.fixture
def snapshot():
    return summarize(recorded(1, at=100.0), recorded(2, at=102.0))


def test_rates_come_from_counter_deltas_over_the_scrape_interval(snapshot) -> None:
    assert snapshot.seconds == 2.0
    assert snapshot.requests_per_second == 16.0
    assert snapshot.completion_tokens_per_second == 820.0
    assert snapshot.prompt_tokens_per_second == pytest.approx((10 * 20 + 10 * 16 + 4) / 2)


def test_latency_percentiles_use_only_the_histogram_deltas(snapshot) -> None:
    # The first window's 150 slow TTFTs (2 s) would dominate a cumulative quantile.
    p50, p95, p99 = snapshot.latencies["TTFT"]
    assert p50 == pytest.approx(0.3 + 0.2 * 2 / 14)
    assert p95 == pytest.approx(0.3 + 0.2 * 12.8 / 14)
    assert p99 == pytest.approx(0.3 + 0.2 * 13.76 / 14)


def test_admission_counts_recent_and_total(snapshot) -> None:
    assert snapshot.rejected_by_limit == {"tokens_per_minute": (4.0, 5.0)}
    assert snapshot.unavailable == (3.0, 4.0)
    assert snapshot.server_errors == (1.0, 2.0)


def test_busiest_principals_are_ranked_by_tokens_per_second(snapshot) -> None:
    rows = [(p.name, p.tokens_per_second, p.requests_per_second) for p in snapshot.principals]
    assert rows == [
        ("alice", (10 * 120) / 2, 5.0),
        ("bob", (10 * 76) / 2, 5.0),
        ("dave", (4 * 11) / 2, 2.0),
        ("carol", 0.0, 4.0),
    ]


def test_rendered_dashboard_shows_the_numbers() -> None:
    text = text_of(render_scrapes(recorded(1, 100.0), recorded(2, 102.0), "http://h:8000", 1.0))
    assert "llmserve top · http://h:8000" in text
    assert "model smollm2" in text
    assert "uptime 1h 02m" in text
    assert "health ok" in text
    assert "85.0%" in text  # KV cache
    assert "5 / 64" in text  # queue depth against its limit
    assert "12 / 16" in text  # in flight against the concurrency limit
    assert "820" in text  # tokens/s
    lines = text.splitlines()
    ttft_row = next(line for line in lines if line.strip("│ ").startswith("TTFT  "))
    assert "329 ms" in ttft_row and "483 ms" in ttft_row and "497 ms" in ttft_row
    assert re.search(r"429 tokens_per_minute +4 +5 ", text)  # in the last 2 s, since start
    assert re.search(r"503 unavailable +3 +4 ", text)
    assert re.search(r"5xx errors +1 +2 ", text)
    alice = next(line for line in lines if "alice" in line)
    assert "600" in alice and "5.0" in alice
    assert "vllm" not in text


def test_data_parallel_ranks_each_show_their_kv_cache() -> None:
    current = recorded(2, 102.0)
    current.samples["llmserve_engine_rank_kv_cache_usage_ratio"] = [
        ({"rank": "1"}, 0.85), ({"rank": "0"}, 0.125)]  # fmt: skip
    text = text_of(render_scrapes(recorded(1, 100.0), current, "u", 1.0))
    rows = [line for line in text.splitlines() if "rank " in line]
    assert len(rows) == 2
    assert "rank 0" in rows[0] and "12.5%" in rows[0]
    assert "rank 1" in rows[1] and "85.0%" in rows[1]


def test_one_engine_shows_no_rank_rows() -> None:
    current = recorded(2, 102.0)
    current.samples["llmserve_engine_rank_kv_cache_usage_ratio"] = [({"rank": "0"}, 0.85)]
    assert "rank 0" not in text_of(render_scrapes(recorded(1, 100.0), current, "u", 1.0))


def test_kv_cache_colour_follows_the_thresholds() -> None:
    def style_of_kv(ratio: float) -> str:
        current = recorded(2, 102.0)
        current.samples["llmserve_kv_cache_usage_ratio"] = [({}, ratio)]
        console = Console(record=True, width=120, color_system="truecolor")
        console.print(render_scrapes(recorded(1, 100.0), current, "u", 1.0))
        html = console.export_html(inline_styles=True)
        return html.split(f"{ratio * 100:.1f}%")[0].rsplit("style=", 1)[-1]

    assert "#008000" in style_of_kv(0.5)  # green
    assert "#808000" in style_of_kv(0.85)  # yellow
    assert "#800000" in style_of_kv(0.95)  # red


def test_unreachable_server_is_shown_not_raised() -> None:
    state = ViewState(url="http://h:1", interval=1.0, snapshot=None, error="connection refused")
    text = text_of(render_dashboard(state))
    assert "unreachable (connection refused), retrying" in text


def test_unhealthy_engine_shows_degraded() -> None:
    current = recorded(2, 102.0, healthy=False)
    text = text_of(render_scrapes(recorded(1, 100.0), current, "u", 1.0))
    assert "health degraded" in text


def test_counter_reset_between_scrapes_counts_from_zero() -> None:
    # The server restarted: the "previous" scrape has the larger counters.
    snap = summarize(recorded(2, at=100.0), recorded(1, at=102.0))
    assert snap.requests_per_second == pytest.approx((150 + 3) / 2)
    assert snap.latencies["TTFT"][0] == pytest.approx(1.5 + 0.5 * 0.5)


def test_no_traffic_between_scrapes_shows_dashes() -> None:
    snap = summarize(recorded(2, at=100.0), recorded(2, at=101.0))
    assert snap.requests_per_second == 0
    assert snap.latencies["TTFT"] == (None, None, None)
    assert snap.principals == []
    text = text_of(render_dashboard(ViewState("u", 1.0, snap)))
    assert "no traffic" in text


def test_histogram_quantile_matches_prometheus() -> None:
    buckets = [(0.1, 10.0), (0.2, 20.0), (float("inf"), 20.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.15)
    assert histogram_quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None
    assert histogram_quantile(0.99, [(0.1, 0.0), (float("inf"), 5.0)]) == 0.1  # +Inf bucket


def test_history_keeps_one_minute_and_sparkline_scales_to_the_max() -> None:
    history = History(seconds=60)
    for i in range(100):
        previous, current = recorded(1, at=float(i)), recorded(2, at=float(i) + 1)
        history.add(summarize(previous, current))
    assert history.points[0].at == 40.0 and history.points[-1].at == 100.0
    assert sparkline([0, 1, 2, 4], 6) == "  ▁▃▅█"
    assert sparkline([None, 0.0], 2) == "·▁"


def test_usage_by_model_comes_from_the_per_model_counters(snapshot) -> None:
    rows = [(m.name, m.tokens_per_second, m.requests_per_second, m.tokens)
            for m in snapshot.models]  # fmt: skip
    assert rows == [
        ("smollm2", (10 * 120 + 4 * 11) / 2, 7.0, 100 * 50 + 10 * 120 + 4 * 11),
        ("smollm2-lora-a", (10 * 76) / 2, 5.0, 50 * 40 + 10 * 76),
    ]
    text = text_of(render_dashboard(ViewState("u", 1.0, snapshot)))
    lora = next(line for line in text.splitlines() if "smollm2-lora-a" in line)
    assert re.search(r"smollm2-lora-a +380 +5\.0 +2,760", lora)
    assert "bob" in lora  # beside the busiest principals


def test_a_models_own_window_has_its_own_429_row() -> None:
    previous, current = recorded(1, 100.0), recorded(2, 102.0)
    current.samples["llmserve_rate_limit_rejections_total"] = [
        ({"limit": "tokens_per_minute", "model": ""}, 5.0),
        ({"limit": "requests_per_minute", "model": "smollm2-lora-a"}, 3.0),
    ]  # fmt: skip
    snap = summarize(previous, current)
    assert snap.rejected_by_limit == {
        "requests_per_minute (smollm2-lora-a)": (3.0, 3.0),
        "tokens_per_minute": (4.0, 5.0),
    }
    text = text_of(render_dashboard(ViewState("u", 1.0, snap)), width=160)
    assert re.search(r"429 requests_per_minute \(smollm2-lora-a\) +3 +3 ", text)


def test_a_server_without_per_model_counters_shows_no_model_rows() -> None:
    previous, current = recorded(1, 100.0), recorded(2, 102.0)
    for scrape in (previous, current):
        for name in ("llmserve_model_requests_total", "llmserve_model_tokens_total"):
            scrape.samples.pop(name, None)
    snap = summarize(previous, current)
    assert snap.models == []
    assert "no requests yet" in text_of(render_dashboard(ViewState("u", 1.0, snap)))
