"""The errors a client sees from the admission queue, with their headers."""

from __future__ import annotations

from llmserve.errors import (
    DeadlineExceeded,
    ServiceUnavailable,
    retry_after_header,
    shutting_down,
)

__all__ = [
    "DeadlineExceeded",
    "deadline_exceeded",
    "queue_timeout",
    "server_overloaded",
    "shutting_down",
]


def deadline_exceeded() -> DeadlineExceeded:
    return DeadlineExceeded(
        "The request did not start before its deadline (X-Request-Timeout); "
        "retry later or allow more time."
    )


def server_overloaded(retry_after: int, why: str | None = None) -> ServiceUnavailable:
    """503 at the door: the queue is full, or (`why`) the request could not start in time."""
    reason = f"at capacity: {why}" if why else "at capacity and its queue is full"
    return ServiceUnavailable(
        f"The server is {reason}; retry after {retry_after} s.",
        code="server_overloaded",
        headers=retry_after_header(retry_after),
    )


def queue_timeout(waited: float, retry_after: int) -> ServiceUnavailable:
    return ServiceUnavailable(
        f"The request waited {waited:.1f} s for a free slot without starting; "
        f"retry after {retry_after} s.",
        code="queue_timeout",
        headers=retry_after_header(retry_after),
    )
