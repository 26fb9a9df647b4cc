"""Predicted time to first token of a request that joins the queue now (pure arithmetic).

    predicted TTFT = predicted wait for a slot + predicted prefill of its prompt

- The wait: the requests that will be served before it (all those of its priority or higher,
  and of each lower class the share stride scheduling gives it; fairness.py), plus one slot to
  free, divided by the rate at which slots free up (drain.py). Zero when a slot is free now.
  Before any completion there is only evidence of a bound: when nothing has finished after
  `t` seconds of use, a request holds its slot for at least `t`, so slots free up at most
  `max_concurrency / t` per second. The wait predicted from that bound is the shortest
  possible, so a request it refuses could not have made it: a burst on a fresh server is never
  refused on a guess (the engine may be far faster than any prior), but it is refused at the
  door once the engine has shown it is slow.
- The prefill: `intercept + slope * prompt_tokens`, fitted by least squares with exponential
  forgetting over the observed (prompt tokens, seconds from admission to first token) of
  recent requests. Before enough history, a prior (PRIOR_PREFILL_*), meant to be pessimistic
  for a GPU and about right for a small model on a CPU.

The queue refuses at the door a request whose prediction exceeds DOOR_SHARE of its objective
(the tier's `ttft_slo_seconds`, or the time left to its deadline), so a client learns at once,
with a Retry-After from the same prediction, instead of after waiting for nothing. The margin:
under overload the queue settles where the newest request's prediction just meets the door's
bound, so every admitted waiter is a borderline case, and a prediction a little short (the drain
rate is a count over a few seconds: +-15%) would otherwise send it away at its objective, after
waiting for nothing; waiting at most DOOR_SHARE of the objective leaves that error room.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PRIOR_REQUEST_SECONDS = 5.0  # how long a request holds its slot, before any completion
PRIOR_PREFILL_SECONDS = 0.05  # fixed part of the time from admission to the first token
PRIOR_PREFILL_SECONDS_PER_TOKEN = 1 / 2000  # and its part per prompt token
FORGETTING = 0.95  # weight of the past at each new observation (about the last 20 count)
MIN_OBSERVATIONS = 3.0  # effective observations before the fit replaces the prior
DOOR_SHARE = 0.8  # the door admits a predicted time to first token up to this much of the goal


@dataclass(frozen=True, slots=True)
class Prediction:
    wait_seconds: float
    prefill_seconds: float

    @property
    def ttft_seconds(self) -> float:
        return self.wait_seconds + self.prefill_seconds


class PrefillModel:
    """seconds = intercept + slope * prompt_tokens, fitted online with forgetting."""

    def __init__(self) -> None:
        self._n = self._x = self._y = self._xx = self._xy = 0.0

    def observe(self, prompt_tokens: int, seconds: float) -> None:
        if seconds < 0:
            return
        f, x = FORGETTING, float(prompt_tokens)
        self._n = f * self._n + 1.0
        self._x = f * self._x + x
        self._y = f * self._y + seconds
        self._xx = f * self._xx + x * x
        self._xy = f * self._xy + x * seconds

    def seconds(self, prompt_tokens: int) -> float:
        if self._n < MIN_OBSERVATIONS:
            return PRIOR_PREFILL_SECONDS + PRIOR_PREFILL_SECONDS_PER_TOKEN * prompt_tokens
        mean_x, mean_y = self._x / self._n, self._y / self._n
        var_x = self._xx / self._n - mean_x * mean_x
        if var_x <= 1e-9:  # every prompt the same length: the mean is the best guess
            return max(0.0, mean_y)
        slope = max(0.0, (self._xy / self._n - mean_x * mean_y) / var_x)
        intercept = max(0.0, mean_y - slope * mean_x)
        return intercept + slope * prompt_tokens


def requests_ahead(
    priority: int, waiting: dict[int, int], weight_of: dict[int, float]
) -> float:
    """How many of the waiters are served before a newcomer of `priority`: everyone of its
    class and the higher ones, and of each lower class the share its weight gets meanwhile."""
    own = weight_of.get(priority, 1.0)
    before = sum(n for p, n in waiting.items() if p >= priority)
    lower = sum(
        min(float(n), before * weight_of.get(p, 1.0) / own)
        for p, n in waiting.items()
        if p < priority
    )
    return before + lower


def wait_seconds(ahead: float, drain_per_second: float) -> float:
    """Seconds until `ahead + 1` slots have freed up."""
    return (ahead + 1.0) / drain_per_second


def bound_drain_rate(max_concurrency: int, busy_seconds: float) -> float:
    """The most slot releases per second there can be when none was seen while the slots were
    busy for `busy_seconds` (infinite at first: no evidence yet)."""
    return max_concurrency / busy_seconds if busy_seconds > 0 else math.inf
