"""OpenAI's x-ratelimit-* response headers, from the windows' status.

OpenAI writes resets as Go durations ("1s", "6m0s", "20ms", "1h2m3.5s"). The requests trio
describes requests_per_minute; the tokens trio describes tokens_per_minute, or, for a tier
without one, whichever token window (day or month) has the least left. A trio whose window
the tier does not have is left out rather than invented.

A request for a model with windows of its own (a tier's `models`) also gets LiteLLM's
per-model trios, picked the same way among that model's windows:
`x-ratelimit-model_per_key-limit-requests`, `-remaining-requests`, `-reset-requests` and the
`-tokens` trio. The plain trios keep describing the tier's own windows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from llmserve.limits.windows import WindowStatus

_MS_PER_HOUR = 3_600_000
_MS_PER_MINUTE = 60_000


def format_duration(seconds: float) -> str:
    """Go's time.Duration text, rounded up to the millisecond so a client never retries early."""
    total_ms = max(0, math.ceil(seconds * 1000 - 1e-6))
    if total_ms == 0:
        return "0s"
    if total_ms < 1000:
        return f"{total_ms}ms"
    hours, rest = divmod(total_ms, _MS_PER_HOUR)
    minutes, rest = divmod(rest, _MS_PER_MINUTE)
    whole, fraction = divmod(rest, 1000)
    text = f"{whole}.{fraction:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    if minutes:
        return f"{minutes}m{text}"
    return text


OVERALL_PREFIX = "x-ratelimit"
MODEL_PREFIX = "x-ratelimit-model_per_key"  # LiteLLM's name for a key's limits on one model


def _trio(kind: str, window: WindowStatus, prefix: str = OVERALL_PREFIX) -> dict[str, str]:
    return {
        f"{prefix}-limit-{kind}": str(window.limit),
        f"{prefix}-remaining-{kind}": str(window.remaining),
        f"{prefix}-reset-{kind}": format_duration(window.reset_seconds),
    }


def pick_token_window(windows: Sequence[WindowStatus]) -> WindowStatus | None:
    by_name = {w.name: w for w in windows}
    if "tokens_per_minute" in by_name:
        return by_name["tokens_per_minute"]
    calendar = [by_name[n] for n in ("tokens_per_day", "tokens_per_month") if n in by_name]
    return min(calendar, key=lambda w: w.remaining, default=None)


def rate_limit_headers(
    windows: Sequence[WindowStatus],
    refused_by: str | None = None,
    refused_model: str | None = None,
) -> dict[str, str]:
    """The requests and tokens trios (and the per-model ones: module docstring); on a 429, the
    tokens trio describes the window that refused (a day's budget, not the minute's, when the
    day ran out): `refused_by` of the model `refused_model`, or of the tier's own when None."""
    if all(w.model is None for w in windows):
        return _trios(windows, refused_by, OVERALL_PREFIX)
    overall = [w for w in windows if w.model is None]
    per_model = [w for w in windows if w.model is not None]
    headers = _trios(overall, refused_by if refused_model is None else None, OVERALL_PREFIX)
    headers.update(_trios(per_model, refused_by if refused_model else None, MODEL_PREFIX))
    return headers


def _trios(windows: Sequence[WindowStatus], refused_by: str | None, prefix: str) -> dict[str, str]:
    headers: dict[str, str] = {}
    for window in windows:
        if window.name == "requests_per_minute":
            headers.update(_trio("requests", window, prefix))
    refusing = [w for w in windows if w.name == refused_by and w.name.startswith("tokens_")]
    tokens = refusing[0] if refusing else pick_token_window(windows)
    if tokens is not None:
        headers.update(_trio("tokens", tokens, prefix))
    return headers
