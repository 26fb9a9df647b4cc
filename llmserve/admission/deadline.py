"""The client's deadline: `X-Request-Timeout: <seconds>` or the config default."""

from __future__ import annotations

import math

from llmserve.errors import InvalidRequest

REQUEST_TIMEOUT_HEADER = "X-Request-Timeout"


def request_deadline(header: str | None, default_seconds: float | None, now: float) -> float | None:
    """Absolute deadline on the queue's clock (`now` from `queue.clock()`), or None for none.

    The header wins over the default; it must be a positive number of seconds (fractions ok).
    """
    if header is None or not header.strip():
        return None if default_seconds is None else now + default_seconds
    try:
        seconds = float(header)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidRequest(
            f"{REQUEST_TIMEOUT_HEADER} must be a positive number of seconds, got {header[:40]!r}.",
            param=REQUEST_TIMEOUT_HEADER,
        )
    return now + seconds
