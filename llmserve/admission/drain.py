"""How fast the queue drains: completions per second over a recent window (pure arithmetic).

The rate is the number of slot releases in the last `window_seconds`, divided by the window
(or by the time since the estimator was created, while that is shorter). Wait estimates and
Retry-After are `requests ahead / rate`. After an idle spell (no completion in the window) the
last rate measured stands: an idle engine has not become slower. Before any completion the
rate is unknown (None) and callers use a prior.
"""

from __future__ import annotations

import math
from collections import deque

DEFAULT_WINDOW_SECONDS = 10.0


class DrainRate:
    def __init__(self, start: float, window_seconds: float = DEFAULT_WINDOW_SECONDS) -> None:
        if window_seconds <= 0:
            raise ValueError("window_seconds must be positive")
        self._start = start
        self._window = window_seconds
        self._completions: deque[float] = deque()
        self._last_rate: float | None = None  # the rate when the window last held completions

    def record(self, now: float) -> None:
        self._completions.append(now)
        self._forget_before(now - self._window)
        span = min(self._window, now - self._start)
        if span > 0:
            self._last_rate = len(self._completions) / span

    def per_second(self, now: float) -> float | None:
        self._forget_before(now - self._window)
        span = min(self._window, now - self._start)
        if not self._completions or span <= 0:
            return self._last_rate
        self._last_rate = len(self._completions) / span
        return self._last_rate

    def seconds_for(self, count: int, now: float) -> float | None:
        """Expected time for `count` more completions; None while the rate is unknown."""
        rate = self.per_second(now)
        if rate is None:
            return None
        return count / rate

    def _forget_before(self, cutoff: float) -> None:
        completions = self._completions
        while completions and completions[0] <= cutoff:
            completions.popleft()


def retry_after_seconds(estimate: float | None, ceiling: float) -> int:
    """Whole seconds, at least 1, at most `ceiling` (rounded up); the ceiling when unknown.

    The ceiling is the queue's max wait: by then every request waiting now has either started
    or given up, so waiting longer than that is never needed to find room.
    """
    seconds = ceiling if estimate is None else min(estimate, ceiling)
    return max(1, math.ceil(seconds))
