"""What the queue tells the metrics: one small callback protocol.

Calls happen synchronously on the event loop, after the queue's own state is updated, so an
observer may read `queue.depth` / `queue.in_flight` from inside a callback. Keep them cheap.
"""

from __future__ import annotations

from typing import Literal, Protocol

RejectReason = Literal[
    "queue_full",  # no free slot and max_depth requests already waiting (503 server_overloaded)
    "queue_tokens",  # waiting would exceed max_queued_tokens (503 server_overloaded)
    "queue_timeout",  # waited max_wait_seconds without a slot (503 queue_timeout)
    "deadline",  # the client's X-Request-Timeout passed while queued (504 deadline_exceeded)
    "cancelled",  # the client went away (or the caller released the ticket) while queued
    "shutting_down",  # the queue was closed (503 shutting_down)
    "slo",  # could not start within its time-to-first-token objective (503 server_overloaded)
]


class AdmissionObserver(Protocol):
    def admitted(self, priority: int, wait_seconds: float) -> None:
        """A request got a slot after `wait_seconds` in the queue (0.0 on the fast path)."""

    def rejected(self, priority: int, reason: RejectReason, wait_seconds: float) -> None:
        """A request left without a slot (`wait_seconds` 0.0 when refused at the door)."""

    def released(self, priority: int, held_seconds: float) -> None:
        """A request gave its slot back after holding it `held_seconds`."""

    def predicted(self, priority: int, predicted_seconds: float, waited_seconds: float) -> None:
        """A request that waited got its slot: what the queue predicted at the door, and the
        wait it really had."""


class NullObserver:
    def admitted(self, priority: int, wait_seconds: float) -> None:
        pass

    def rejected(self, priority: int, reason: RejectReason, wait_seconds: float) -> None:
        pass

    def released(self, priority: int, held_seconds: float) -> None:
        pass

    def predicted(self, priority: int, predicted_seconds: float, waited_seconds: float) -> None:
        pass
