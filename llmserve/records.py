"""What the gateway knows about one request when it ends: fed to metrics and the usage ledger."""

from __future__ import annotations

from dataclasses import dataclass, field

# Routes that generate (their requests are usage: ledger, latency metrics)
GENERATION_ROUTES = frozenset({"chat", "completions", "responses"})


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    route: str  # "chat", "completions", "models", "health", "ready", "metrics", "other"
    started_at: float  # epoch seconds (wall clock), for the ledger
    principal_id: str | None = None  # a key's public id or JWT subject; never a secret
    tier: str | None = None
    model: str | None = None  # as the request names it (an alias stays an alias)
    root_model: str | None = None  # the served model it runs: the base model or an adapter
    stream: bool = False
    status: int = 0
    error_code: str | None = None  # the OpenAI error `code` when status >= 400
    rejected_by: str | None = None  # 429: which limit ("requests_per_minute", "tokens_per_day"...)
    rejected_model: str | None = None  # 429: the model whose own window it was (tiers' models)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop", "length", or None (aborted / failed)
    queue_wait_seconds: float | None = None  # time waiting for an engine slot
    ttft_seconds: float | None = None  # request start to first token written
    total_seconds: float = 0.0  # request start to the last byte
    engine_seconds: float = 0.0  # time spent awaiting the engine (the rest is gateway overhead)
    inter_token_seconds: list[float] = field(default_factory=list)  # gaps between token chunks
    disconnected: bool = False  # the client went away before the end
    delivered: bool = False  # the whole response (a stream's last event) was handed to the socket
    admitted: bool = False  # passed the rate limiter (and so is usage, for the ledger)
    metadata: dict[str, str] | None = None  # the request's OpenAI `metadata` (bounded)
    shadow_refused: str | None = None  # the tier's shadow window that would have refused it

    @property
    def overhead_seconds(self) -> float:
        waited = self.queue_wait_seconds or 0.0
        return max(0.0, self.total_seconds - self.engine_seconds - waited)
