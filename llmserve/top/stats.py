"""What the dashboard shows, computed purely from two scrapes: rates, quantiles, gauges.

Counters and histograms are cumulative, so everything "recent" is a delta between the previous
and the current scrape (a counter that went down means the server restarted: the delta is then
the current value, as Prometheus' rate() does).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from llmserve.records import GENERATION_ROUTES
from llmserve.top.scrape import Scrape

QUANTILES = (0.5, 0.95, 0.99)
LATENCIES = (  # (row title, histogram name)
    ("TTFT", "llmserve_time_to_first_token_seconds"),
    ("inter-token", "llmserve_inter_token_latency_seconds"),
    ("queue wait", "llmserve_queue_wait_seconds"),
    ("overhead", "llmserve_gateway_overhead_seconds"),
)
HISTORY_SECONDS = 60.0


def counter_delta(previous: float, current: float) -> float:
    return current - previous if current >= previous else current


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over cumulative (bound, count) pairs; None if empty."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # the +Inf bucket: the highest finite bound is all we know
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound


def bucket_deltas(
    previous: list[tuple[float, float]], current: list[tuple[float, float]]
) -> list[tuple[float, float]]:
    before = dict(previous)
    if any(count < before.get(bound, 0.0) for bound, count in current):
        return current  # restarted between the scrapes
    return [(bound, count - before.get(bound, 0.0)) for bound, count in current]


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    tokens_per_second: float
    requests_per_second: float


@dataclass(frozen=True, slots=True)
class ModelUsage:
    name: str  # a served model (an alias counted as its model), or "other"
    tokens_per_second: float
    requests_per_second: float
    tokens: float  # since the server started


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the dashboard needs from (previous, current) scrapes."""

    at: float
    seconds: float  # between the two scrapes
    model: str
    version: str
    uptime_seconds: float | None
    healthy: bool | None
    engine_healthy: bool | None
    kv_cache_usage: float | None
    running: float | None
    waiting: float | None
    queue_depth: float | None
    queue_limit: float | None
    in_flight: float | None
    concurrency_limit: float | None
    requests_per_second: float
    prompt_tokens_per_second: float
    completion_tokens_per_second: float
    latencies: dict[str, tuple[float | None, ...]]  # title -> one value per QUANTILES
    # limit ("tokens_per_minute", or a model's own: "tokens_per_minute (smollm2-lora-a)") ->
    # (in the interval, total)
    rejected_by_limit: dict[str, tuple[float, float]]
    unavailable: tuple[float, float]  # 503s
    server_errors: tuple[float, float]  # other 5xx
    principals: list[Principal] = field(default_factory=list)
    models: list[ModelUsage] = field(default_factory=list)  # most tokens/s first
    # data parallel: each engine's KV cache use, by rank (empty with one engine)
    rank_kv_cache_usage: list[tuple[str, float]] = field(default_factory=list)


def summarize(previous: Scrape, current: Scrape, top_principals: int = 8) -> Snapshot:
    seconds = max(current.at - previous.at, 1e-9)

    def rate(name: str, **match: str) -> float:
        return counter_delta(previous.total(name, **match), current.total(name, **match)) / seconds

    info = current.series("llmserve_info")
    info_labels = info[0][0] if info else {}
    start = current.value("llmserve_start_time_seconds")
    engine_up = current.value("llmserve_engine_healthy")
    return Snapshot(
        at=current.at,
        seconds=seconds,
        model=info_labels.get("model", "") or "?",
        version=info_labels.get("version", ""),
        uptime_seconds=max(0.0, current.wall - start) if start else None,
        healthy=current.healthy,
        engine_healthy=None if engine_up is None else engine_up > 0,
        kv_cache_usage=current.value("llmserve_kv_cache_usage_ratio"),
        running=current.value("llmserve_engine_running_requests"),
        waiting=current.value("llmserve_engine_waiting_requests"),
        queue_depth=current.value("llmserve_queue_depth"),
        queue_limit=current.value("llmserve_queue_max_depth"),
        in_flight=current.value("llmserve_in_flight_requests"),
        concurrency_limit=current.value("llmserve_concurrency_limit"),
        requests_per_second=sum(
            rate("llmserve_requests_total", route=r) for r in sorted(GENERATION_ROUTES)
        ),
        prompt_tokens_per_second=rate("llmserve_tokens_total", type="prompt"),
        completion_tokens_per_second=rate("llmserve_tokens_total", type="completion"),
        latencies=_latencies(previous, current),
        rejected_by_limit=_rejections(previous, current),
        unavailable=_status_counts(previous, current, lambda s: s == "503"),
        server_errors=_status_counts(previous, current, lambda s: s.startswith("5") and s != "503"),
        principals=_principals(previous, current, seconds)[:top_principals],
        models=_models(previous, current, seconds),
        rank_kv_cache_usage=_ranks(current),
    )


def _ranks(current: Scrape) -> list[tuple[str, float]]:
    ranks = current.series("llmserve_engine_rank_kv_cache_usage_ratio")
    if len(ranks) < 2:
        return []  # one engine: the headline says it all
    return sorted(((labels.get("rank", "?"), value) for labels, value in ranks),
                  key=lambda item: int(item[0]) if item[0].isdigit() else -1)  # fmt: skip


def _latencies(previous: Scrape, current: Scrape) -> dict[str, tuple[float | None, ...]]:
    out = {}
    for title, name in LATENCIES:
        deltas = bucket_deltas(previous.buckets(name), current.buckets(name))
        out[title] = tuple(histogram_quantile(q, deltas) for q in QUANTILES)
    return out


def _by_label(scrape: Scrape, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for labels, value in scrape.series(name):
        key = labels.get(label, "")
        out[key] = out.get(key, 0.0) + value
    return out


def _rejections(previous: Scrape, current: Scrape) -> dict[str, tuple[float, float]]:
    before, now = _by_limit(previous), _by_limit(current)
    return {k: (counter_delta(before.get(k, 0.0), v), v) for k, v in sorted(now.items())}


def _by_limit(scrape: Scrape) -> dict[str, float]:
    """429s by window, a model's own windows apart: "tokens_per_minute (smollm2-lora-a)"."""
    out: dict[str, float] = {}
    for labels, value in scrape.series("llmserve_rate_limit_rejections_total"):
        limit, model = labels.get("limit", ""), labels.get("model", "")
        key = f"{limit} ({model})" if model else limit
        out[key] = out.get(key, 0.0) + value
    return out


def _status_counts(
    previous: Scrape, current: Scrape, wanted: Callable[[str], bool]
) -> tuple[float, float]:
    name = "llmserve_requests_total"
    before, now = _by_label(previous, name, "status"), _by_label(current, name, "status")
    statuses = [s for s in now if wanted(s)]
    recent = sum(counter_delta(before.get(s, 0.0), now[s]) for s in statuses)
    return recent, sum(now[s] for s in statuses)


def _principals(previous: Scrape, current: Scrape, seconds: float) -> list[Principal]:
    rows = [Principal(name, tokens, requests)
            for name, tokens, requests, _ in _usage(previous, current, seconds, "principal")
            if tokens > 0 or requests > 0]  # fmt: skip
    return sorted(rows, key=lambda r: (-r.tokens_per_second, -r.requests_per_second, r.name))


def _models(previous: Scrape, current: Scrape, seconds: float) -> list[ModelUsage]:
    rows = [ModelUsage(*row) for row in _usage(previous, current, seconds, "model")]
    return sorted(rows, key=lambda r: (-r.tokens_per_second, -r.requests_per_second, r.name))


def _usage(
    previous: Scrape, current: Scrape, seconds: float, label: str
) -> list[tuple[str, float, float, float]]:
    """Per value of `label` of llmserve_{label}_tokens_total and _requests_total: (name,
    tokens/s, requests/s, tokens since the server started)."""
    tokens_before = _by_label(previous, f"llmserve_{label}_tokens_total", label)
    tokens_now = _by_label(current, f"llmserve_{label}_tokens_total", label)
    requests_before = _by_label(previous, f"llmserve_{label}_requests_total", label)
    requests_now = _by_label(current, f"llmserve_{label}_requests_total", label)
    return [
        (
            name,
            counter_delta(tokens_before.get(name, 0.0), tokens_now.get(name, 0.0)) / seconds,
            counter_delta(requests_before.get(name, 0.0), requests) / seconds,
            tokens_now.get(name, 0.0),
        )
        for name, requests in requests_now.items()
    ]


@dataclass(frozen=True, slots=True)
class Point:
    at: float
    requests_per_second: float
    tokens_per_second: float
    ttft_p95: float | None
    queue_depth: float | None


class History:
    """The last minute of headline numbers, for the sparklines."""

    def __init__(self, seconds: float = HISTORY_SECONDS) -> None:
        self.seconds = seconds
        self.points: deque[Point] = deque()

    def add(self, snapshot: Snapshot) -> None:
        ttft = snapshot.latencies.get("TTFT", (None, None, None))
        self.points.append(
            Point(
                snapshot.at,
                snapshot.requests_per_second,
                snapshot.completion_tokens_per_second,
                ttft[1],
                snapshot.queue_depth,
            )
        )
        while self.points and self.points[0].at < snapshot.at - self.seconds:
            self.points.popleft()
