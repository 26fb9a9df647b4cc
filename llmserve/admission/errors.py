"""The errors a client sees from the admission queue, with their headers.

`DeadlineExceeded` belongs in llmserve/errors.py next to the other APIErrors; it lives here
until the lead moves it (the module re-exports it either way).
"""

from __future__ import annotations

from llmserve.errors import APIError, ServiceUnavailable, retry_after_header


class DeadlineExceeded(APIError):
    """The client's own deadline (X-Request-Timeout) passed before the request could finish.

    504 as in gRPC's DEADLINE_EXCEEDED mapping: the server gave up on the caller's schedule.
    No Retry-After: retrying with the same deadline under the same load would fail again.
    """

    status = 504
    error_type = "server_error"
    default_code = "deadline_exceeded"


def deadline_exceeded() -> DeadlineExceeded:
    return DeadlineExceeded(
        "The request did not start before its deadline (X-Request-Timeout); "
        "retry later or allow more time."
    )


def server_overloaded(retry_after: int) -> ServiceUnavailable:
    return ServiceUnavailable(
        f"The server is at capacity and its queue is full; retry after {retry_after} s.",
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


def shutting_down() -> ServiceUnavailable:
    return ServiceUnavailable(
        "The server is shutting down; retry on another instance or in a moment.",
        code="shutting_down",
        headers=retry_after_header(1),
    )
