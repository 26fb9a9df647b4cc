"""Skip a failing store for a moment, so a dead Redis costs each request nothing, not a timeout.

After a failure the store is not called for `cooldown` seconds (the policy answers instead);
then the next call tries it again, and one success closes the breaker.
"""

from __future__ import annotations

from collections.abc import Callable


class StoreBreaker:
    def __init__(self, clock: Callable[[], float], cooldown: float = 1.0) -> None:
        self._clock = clock
        self._cooldown = cooldown
        self._retry_at: float | None = None

    def allows_call(self) -> bool:
        return self._retry_at is None or self._clock() >= self._retry_at

    def retry_in(self) -> float:
        """Seconds until the store will be tried again (what a 503's Retry-After says)."""
        if self._retry_at is None:
            return self._cooldown
        return max(self._retry_at - self._clock(), 0.0) or self._cooldown

    def record_failure(self) -> bool:
        """Open (or keep open) the breaker; True when the store was healthy until now."""
        was_healthy = self._retry_at is None
        self._retry_at = self._clock() + self._cooldown
        return was_healthy

    def record_success(self) -> bool:
        """Close the breaker; True when the store was failing until now."""
        was_failing = self._retry_at is not None
        self._retry_at = None
        return was_failing
