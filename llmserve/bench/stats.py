"""The figures of a run, computed from request records: pure functions, no I/O, no clock.

Definitions are those of `vllm bench serve` (vllm/benchmarks/serve.py, `calculate_metrics`):
- TTFT: send to the first chunk carrying `choices` (in chat that is the role chunk).
- TPOT: per request, (E2EL - TTFT) / (output tokens - 1); requests of one token are left out
  (and count as TPOT 0 for goodput).
- ITL: every gap between consecutive `choices` chunks, pooled over all requests.
- E2EL: send to the last `choices` chunk.
- Throughputs divide by the whole run's duration; only successful requests count.
- Percentiles interpolate linearly between closest ranks (numpy's default); std is the
  population standard deviation. An empty list summarises as zeros, as in vLLM.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from llmserve.bench.records import (
    QUEUE_WAIT_HEADER,
    RATE_LIMIT_HEADERS,
    RETRY_AFTER,
    RequestResult,
)

GOODPUT_METRICS = ("ttft", "tpot", "e2el")


def percentile(values: Sequence[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def std(values: Sequence[float]) -> float:
    if not values:
        return 0.0
    centre = mean(values)
    return math.sqrt(sum((v - centre) ** 2 for v in values) / len(values))


@dataclass(frozen=True, slots=True)
class Summary:
    """One metric in milliseconds: mean, median, std and the selected percentiles."""

    mean: float
    median: float
    std: float
    percentiles: tuple[tuple[float, float], ...]


def summarize(seconds: Sequence[float], percentiles: Sequence[float]) -> Summary:
    ms = [s * 1000.0 for s in seconds]
    return Summary(
        mean=mean(ms),
        median=percentile(ms, 50),
        std=std(ms),
        percentiles=tuple((p, percentile(ms, p)) for p in percentiles),
    )


def output_len(result: RequestResult) -> int:
    """The server's usage count; without usage, one token per `choices` chunk."""
    if not result.success:
        return 0
    if result.output_tokens is not None:
        return result.output_tokens
    return len(result.itl) + 1


def tpot(result: RequestResult) -> float | None:
    tokens = output_len(result)
    if tokens <= 1:
        return None
    return (result.latency - result.ttft) / (tokens - 1)


def is_good(result: RequestResult, slo_ms: dict[str, float]) -> bool:
    """Every given SLO (milliseconds) is met; one-token requests have TPOT 0, as in vLLM."""
    measured = {"ttft": result.ttft, "tpot": tpot(result) or 0.0, "e2el": result.latency}
    return all(measured[name] <= limit / 1000.0 for name, limit in slo_ms.items())


@dataclass(frozen=True, slots=True)
class BenchmarkMetrics:
    completed: int
    failed: int
    total_input: int
    total_output: int
    request_throughput: float
    request_goodput: float
    output_throughput: float
    total_token_throughput: float
    max_output_tokens_per_s: float
    max_concurrent_requests: int
    ttft: Summary
    tpot: Summary
    itl: Summary
    e2el: Summary


def compute_metrics(
    results: Sequence[RequestResult],
    duration: float,
    percentiles: Sequence[float],
    goodput_slo_ms: dict[str, float] | None = None,
) -> BenchmarkMetrics:
    ok = [r for r in results if r.success]
    outputs = [output_len(r) for r in ok]
    total_input = sum(r.prompt_len for r in ok)
    good = sum(is_good(r, goodput_slo_ms) for r in ok) if goodput_slo_ms else 0
    per_second = 1.0 / duration if duration > 0 else 0.0
    peak_tokens, peak_concurrency = peak_rates(ok)
    return BenchmarkMetrics(
        completed=len(ok),
        failed=len(results) - len(ok),
        total_input=total_input,
        total_output=sum(outputs),
        request_throughput=len(ok) * per_second,
        request_goodput=good * per_second,
        output_throughput=sum(outputs) * per_second,
        total_token_throughput=(total_input + sum(outputs)) * per_second,
        max_output_tokens_per_s=peak_tokens,
        max_concurrent_requests=peak_concurrency,
        ttft=summarize([r.ttft for r in ok], percentiles),
        tpot=summarize([t for r in ok if (t := tpot(r)) is not None], percentiles),
        itl=summarize([gap for r in ok for gap in r.itl], percentiles),
        e2el=summarize([r.latency for r in ok], percentiles),
    )


def peak_rates(ok: Sequence[RequestResult]) -> tuple[float, int]:
    """vLLM's peaks: `choices` chunks and requests in flight per whole second of the run."""
    if not ok:
        return 0.0, 0
    origin = min(r.start_time for r in ok)
    buckets = math.ceil(max(r.start_time + r.latency for r in ok) - origin) + 1
    tokens, concurrent = [0] * buckets, [0] * buckets
    for r in ok:
        moment = r.start_time + r.ttft
        for gap in [0.0, *r.itl]:
            moment += gap
            if 0 <= (second := int(moment - origin)) < buckets:
                tokens[second] += 1
        first, last = int(r.start_time - origin), int(r.start_time + r.latency - origin)
        for second in range(first, min(last, buckets - 1) + 1):
            concurrent[second] += 1
    return float(max(tokens)), max(concurrent)


def parse_goodput(pairs: Iterable[str]) -> dict[str, float]:
    """`["ttft:200", "tpot:50"]` -> {"ttft": 200.0, "tpot": 50.0}; raises ValueError."""
    slo: dict[str, float] = {}
    for pair in pairs:
        name, sep, value = pair.partition(":")
        if not sep or name not in GOODPUT_METRICS:
            raise ValueError(f"goodput {pair!r}: expected NAME:MS with NAME in ttft, tpot, e2el")
        try:
            slo[name] = float(value)
        except ValueError:
            raise ValueError(f"goodput {pair!r}: {value!r} is not a number") from None
        if slo[name] < 0:
            raise ValueError(f"goodput {pair!r}: the value must not be negative")
    return slo


# --- llmserve's additions -------------------------------------------------------------------

_LIMIT_PATTERN = re.compile(r"(requests|tokens)[ _-]?(?:per[ _-]?)?(minute|day|month)")


def limit_hit(result: RequestResult) -> str:
    """Which limit a 429 names (requests_per_minute, tokens_per_day, ...), else "unknown"."""
    for text in (result.error_param, result.error_code, result.error_message):
        if text and (match := _LIMIT_PATTERN.search(text.lower())):
            return f"{match.group(1)}_per_{match.group(2)}"
    return "unknown"


def status_key(result: RequestResult) -> str:
    return str(result.status) if result.status else "no_response"


def error_key(result: RequestResult) -> str | None:
    """One bucket per failure kind: "429:<limit>", "503:<code>", "<status>:<code>"."""
    if result.success:
        return None
    code = result.error_code or "unknown"
    if result.status == 429:
        return f"429:{limit_hit(result)}"
    return f"{status_key(result)}:{code}"


def has_rate_limit_headers(headers: dict[str, str]) -> bool:
    """At least one complete OpenAI trio (limit, remaining, reset) and no partial one.

    A server may leave out the trio of a dimension it does not limit (a tier with no token
    limit has no `x-ratelimit-*-tokens`); a half-sent trio is always a bug.
    """
    trios = [RATE_LIMIT_HEADERS[:3], RATE_LIMIT_HEADERS[3:]]
    present = [sum(h in headers for h in trio) for trio in trios]
    return any(n == 3 for n in present) and all(n in (0, 3) for n in present)


def header_check(results: Sequence[RequestResult]) -> dict[str, object]:
    """Did every 429 and 503 carry Retry-After and the x-ratelimit-* headers?"""
    rejected = [r for r in results if r.status in (429, 503)]
    no_retry = sum(RETRY_AFTER not in r.headers for r in rejected)
    no_limits = sum(not has_rate_limit_headers(r.headers) for r in rejected)
    return {
        "checked": len(rejected),
        "missing_retry_after": no_retry,
        "missing_ratelimit_headers": no_limits,
        "ok": no_retry == 0 and no_limits == 0,
    }


def queue_waits_ms(results: Sequence[RequestResult]) -> list[float]:
    waits = []
    for r in results:
        try:
            waits.append(float(r.headers[QUEUE_WAIT_HEADER]))
        except (KeyError, ValueError):
            continue
    return waits


def llmserve_breakdown(
    results: Sequence[RequestResult], percentiles: Sequence[float]
) -> dict[str, object]:
    """The `llmserve` key of the result: outcomes by status and error, queue wait, headers."""
    waits = queue_waits_ms(results)
    wait_summary = summarize([w / 1000.0 for w in waits], percentiles) if waits else None
    return {
        "status_counts": dict(sorted(Counter(status_key(r) for r in results).items())),
        "error_counts": dict(
            sorted(Counter(k for r in results if (k := error_key(r)) is not None).items())
        ),
        "rate_limited_by": dict(
            sorted(Counter(limit_hit(r) for r in results if r.status == 429).items())
        ),
        "server_queue_wait_ms": None
        if wait_summary is None
        else {"count": len(waits), **summary_dict(wait_summary)},
        "rejection_headers": header_check(results),
        "requests_by_api_key": dict(
            sorted(Counter(r.api_key_index for r in results if r.api_key_index is not None).items())
        ),
    }


def summary_dict(summary: Summary) -> dict[str, float]:
    out = {"mean": summary.mean, "median": summary.median, "std": summary.std}
    out.update({f"p{percentile_word(p)}": v for p, v in summary.percentiles})
    return out


def percentile_word(p: float) -> str:
    """99.0 -> "99", 99.9 -> "99.9": vLLM's spelling in labels and keys."""
    return str(int(p)) if int(p) == p else str(p)
