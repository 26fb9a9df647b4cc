"""What one request produced: the record the runner fills and the statistics read."""

from __future__ import annotations

from dataclasses import dataclass, field

# Client-side error codes, for failures the server did not describe itself.
CONNECTION_ERROR = "connection_error"  # refused, reset, DNS: no HTTP status (status 0)
TIMEOUT = "timeout"
MALFORMED_SSE = "malformed_sse"  # a data payload that is not JSON, or JSON of the wrong shape
STREAM_TRUNCATED = "stream_truncated"  # the connection closed before `data: [DONE]`
NO_TOKEN = "no_token"  # a stream that completed without any choices chunk
CANCELLED = "cancelled"  # stopped by Ctrl-C; never counted (vLLM has no such request)


@dataclass(slots=True)
class RequestResult:
    """Times are seconds on the runner's monotonic clock; `start_time` is when it was sent."""

    index: int
    prompt_len: int
    api_key_index: int | None = None
    success: bool = False
    status: int = 0  # HTTP status; 0 when no response arrived
    error_code: str | None = None
    error_message: str = ""
    error_param: str | None = None
    output_tokens: int | None = None  # the server's usage.completion_tokens, when sent
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    start_time: float = 0.0
    client_queue_time: float = 0.0  # waiting for --max-concurrency before being sent
    generated_text: str = ""
    headers: dict[str, str] = field(default_factory=dict)  # only the ones in KEPT_HEADERS


QUEUE_WAIT_HEADER = "x-queue-wait-ms"
RETRY_AFTER = "retry-after"
RATE_LIMIT_HEADERS = tuple(
    f"x-ratelimit-{kind}-{unit}"
    for unit in ("requests", "tokens")
    for kind in ("limit", "remaining", "reset")
)
KEPT_HEADERS = (QUEUE_WAIT_HEADER, RETRY_AFTER, *RATE_LIMIT_HEADERS)
