"""The result of a run as vLLM's result JSON (plus one `llmserve` key) and its console block.

Keys, labels and the 50-column layout are those of `vllm bench serve` (vllm 0.32,
vllm/benchmarks/serve.py), so the files and the printouts can be set side by side.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from llmserve.bench import stats
from llmserve.bench.records import RequestResult

# (key, console name, console header), in vLLM's order.
METRICS = (
    ("ttft", "TTFT", "Time to First Token"),
    ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
    ("itl", "ITL", "Inter-token Latency"),
    ("e2el", "E2EL", "End-to-end Latency"),
    ("client_queue_time", "Client Queue Time", "Client-side Queueing"),
    (
        "e2el_including_client_queue",
        "E2EL incl. Client Queue",
        "Queue-inclusive End-to-end Latency",
    ),
)
DEFAULT_PERCENTILE_METRICS = "ttft,tpot,itl"  # vLLM's default for generative models
DEFAULT_METRIC_PERCENTILES = "99"  # vLLM's default
# Per-request lists dropped unless --save-detailed (vLLM keeps latencies and queue_times).
DETAILED_FIELDS = (
    "input_lens",
    "output_lens",
    "start_times",
    "ttfts",
    "itls",
    "generated_texts",
    "errors",
)


@dataclass(frozen=True, slots=True)
class RunSettings:
    model_id: str
    endpoint: str
    num_prompts: int
    request_rate: float
    burstiness: float
    max_concurrency: int | None
    percentile_metrics: tuple[str, ...]
    percentiles: tuple[float, ...]
    goodput_slo_ms: dict[str, float] = field(default_factory=dict)
    tokenizer_id: str | None = None
    label: str | None = None
    base_url: str = ""
    api_keys: int = 0
    date: str = field(default_factory=lambda: datetime.now().strftime("%Y%m%d-%H%M%S"))

    @property
    def backend(self) -> str:
        # vLLM's --backend names: "openai" speaks /v1/completions, "openai-chat" the chat API.
        return "openai-chat" if self.endpoint.rstrip("/").endswith("chat/completions") else "openai"


def build_result(
    settings: RunSettings,
    results: Sequence[RequestResult],
    duration: float,
    *,
    interrupted: bool = False,
    detailed: bool = False,
) -> dict[str, Any]:
    metrics = stats.compute_metrics(
        results, duration, settings.percentiles, settings.goodput_slo_ms or None
    )
    result = _header(settings) | _totals(metrics, settings, duration) | _per_request(results)
    result |= {
        "max_output_tokens_per_s": metrics.max_output_tokens_per_s,
        "max_concurrent_requests": metrics.max_concurrent_requests,
        "rtfx": 0.0,
    }
    for name, values in _metric_values(settings, results, metrics).items():
        result |= _metric_keys(name, values)
    if not detailed:
        for key in DETAILED_FIELDS:
            result.pop(key, None)
    result["llmserve"] = stats.llmserve_breakdown(results, settings.percentiles) | {
        "interrupted": interrupted,
        "base_url": settings.base_url,
        "endpoint": settings.endpoint,
        "api_keys": settings.api_keys,
    }
    return result


def _header(settings: RunSettings) -> dict[str, Any]:
    rate = settings.request_rate
    return {
        "date": settings.date,
        "endpoint_type": settings.backend,
        "backend": settings.backend,
        "label": settings.label,
        "model_id": settings.model_id,
        "tokenizer_id": settings.tokenizer_id,
        "num_prompts": settings.num_prompts,
        "request_rate": rate if not math.isinf(rate) else "inf",
        "burstiness": settings.burstiness,
        "max_concurrency": settings.max_concurrency,
    }


def _totals(
    metrics: stats.BenchmarkMetrics, settings: RunSettings, duration: float
) -> dict[str, Any]:
    return {
        "duration": duration,
        "completed": metrics.completed,
        "failed": metrics.failed,
        "total_input_tokens": metrics.total_input,
        "total_output_tokens": metrics.total_output,
        "request_throughput": metrics.request_throughput,
        "request_goodput": metrics.request_goodput if settings.goodput_slo_ms else None,
        "output_throughput": metrics.output_throughput,
        "total_token_throughput": metrics.total_token_throughput,
    }


def _per_request(results: Sequence[RequestResult]) -> dict[str, Any]:
    return {
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [stats.output_len(r) for r in results],
        "ttfts": [r.ttft for r in results],
        "itls": [r.itl for r in results],
        "latencies": [r.latency for r in results],
        "start_times": [r.start_time for r in results],
        "queue_times": [r.client_queue_time for r in results],
        "generated_texts": [r.generated_text for r in results],
        "errors": [_error_text(r) for r in results],
    }


def _error_text(result: RequestResult) -> str:
    if result.success:
        return ""
    return f"HTTP {result.status or '-'} {result.error_code}: {result.error_message}"


def _metric_values(
    settings: RunSettings, results: Sequence[RequestResult], metrics: stats.BenchmarkMetrics
) -> dict[str, stats.Summary]:
    ok = [r for r in results if r.success]
    values = {"ttft": metrics.ttft, "tpot": metrics.tpot, "itl": metrics.itl, "e2el": metrics.e2el}
    if settings.max_concurrency is not None:
        queue = [r.client_queue_time for r in ok]
        values["client_queue_time"] = stats.summarize(queue, settings.percentiles)
        if not math.isinf(settings.request_rate):
            queued_e2el = [r.latency + r.client_queue_time for r in ok]
            values["e2el_including_client_queue"] = stats.summarize(
                queued_e2el, settings.percentiles
            )
    return {k: v for k, v in values.items() if k in settings.percentile_metrics}


def _metric_keys(name: str, summary: stats.Summary) -> dict[str, float]:
    keys = {
        f"mean_{name}_ms": summary.mean,
        f"median_{name}_ms": summary.median,
        f"std_{name}_ms": summary.std,
    }
    for p, value in summary.percentiles:
        keys[f"p{stats.percentile_word(p)}_{name}_ms"] = value
    return keys


# --- console --------------------------------------------------------------------------------


def _line(label: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{label:<40} {value:<10.2f}"
    return f"{label:<40} {value!s:<10}"


def format_console(result: dict[str, Any]) -> str:
    """vLLM's "Serving Benchmark Result" block, then llmserve's own block."""
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]
    lines += [
        _line("Successful requests:", result["completed"]),
        _line("Failed requests:", result["failed"]),
    ]
    if result["max_concurrency"] is not None:
        lines.append(_line("Maximum request concurrency:", result["max_concurrency"]))
    if result["request_rate"] != "inf":
        lines.append(_line("Request rate configured (RPS):", float(result["request_rate"])))
    lines += [
        _line("Benchmark duration (s):", float(result["duration"])),
        _line("Total input tokens:", result["total_input_tokens"]),
        _line("Total generated tokens:", result["total_output_tokens"]),
        _line("Request throughput (req/s):", float(result["request_throughput"])),
    ]
    if result["request_goodput"] is not None:
        lines.append(_line("Request goodput (req/s):", float(result["request_goodput"])))
    lines += [
        _line("Output token throughput (tok/s):", float(result["output_throughput"])),
        _line("Peak output token throughput (tok/s):", float(result["max_output_tokens_per_s"])),
        _line("Peak concurrent requests:", float(result["max_concurrent_requests"])),
        _line("Total token throughput (tok/s):", float(result["total_token_throughput"])),
    ]
    for name, label, header in METRICS:
        lines += _metric_lines(result, name, label, header)
    lines.append("=" * 50)
    return "\n".join([*lines, *_llmserve_lines(result["llmserve"])])


def _metric_lines(result: dict[str, Any], name: str, label: str, header: str) -> list[str]:
    if f"mean_{name}_ms" not in result:
        return []
    lines = ["{s:{c}^{n}}".format(s=header, n=50, c="-")]
    lines.append(_line(f"Mean {label} (ms):", float(result[f"mean_{name}_ms"])))
    lines.append(_line(f"Median {label} (ms):", float(result[f"median_{name}_ms"])))
    suffix = f"_{name}_ms"
    for key, value in result.items():
        word = key[1 : -len(suffix)] if key.startswith("p") and key.endswith(suffix) else ""
        if word and _is_number(word):
            lines.append(_line(f"P{word} {label} (ms):", float(value)))
    return lines


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _llmserve_lines(extra: dict[str, Any]) -> list[str]:
    lines = ["{s:{c}^{n}}".format(s=" llmserve ", n=50, c="=")]
    statuses = ", ".join(f"{k}: {v}" for k, v in extra["status_counts"].items()) or "-"
    lines.append(_line("Responses by HTTP status:", statuses))
    for key, count in extra["error_counts"].items():
        lines.append(_line(f"  {key}:", count))
    wait = extra["server_queue_wait_ms"]
    if wait is None:
        lines.append(_line("Server queue wait (ms):", "not reported"))
    else:
        lines.append(_line("Median server queue wait (ms):", float(wait["median"])))
        lines.append(_line("Mean server queue wait (ms):", float(wait["mean"])))
    checks = extra["rejection_headers"]
    if checks["checked"]:
        verdict = (
            "ok"
            if checks["ok"]
            else (
                f"{checks['missing_retry_after']} without Retry-After, "
                f"{checks['missing_ratelimit_headers']} without x-ratelimit-*"
            )
        )
        lines.append(_line(f"429/503 headers ({checks['checked']}):", verdict))
    if extra.get("interrupted"):
        lines.append("Interrupted: only the requests that completed are counted.")
    lines.append("=" * 50)
    return lines


# --- result file ----------------------------------------------------------------------------


def result_path(
    result: dict[str, Any],
    *,
    result_dir: Path | None = None,
    filename: str | None = None,
) -> Path:
    """vLLM's file name: {label}-{rate}qps[-concurrency{N}]-{model}-{date}.json."""
    if filename is None:
        label = result["label"] or result["backend"]
        rate = result["request_rate"]
        rate_text = str(float(rate)) if rate != "inf" else "inf"
        concurrency = result["max_concurrency"]
        conc = f"-concurrency{concurrency}" if concurrency is not None else ""
        model = str(result["model_id"]).split("/")[-1]
        filename = f"{label}-{rate_text}qps{conc}-{model}-{result['date']}.json"
    return (result_dir / filename) if result_dir else Path(filename)


def write_result(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result), encoding="utf-8")
