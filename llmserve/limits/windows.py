"""Pure window arithmetic: no I/O, no clock of its own (every function takes `now`).

Two kinds of window:

- `bucket` (requests/tokens per minute): a leaky bucket holding `used` units that drains at
  `limit / period` units per second. A request fits when `used + cost <= limit`; when it does
  not, it fits exactly `(used + cost - limit) / rate` seconds later, which is its Retry-After.
- `fixed` (tokens per day/month): a UTC calendar window; usage drops to zero when it ends
  (midnight UTC, or 00:00 UTC on the 1st).

The stores (memory in Python, Redis in Lua) apply the same rules; the Lua scripts mirror
`refill` and `fits` below, so change both together.
"""

from __future__ import annotations

import calendar
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

WindowKind = Literal["bucket", "fixed"]

# Float slack when comparing usage with a limit: a refilled bucket holds fractional units and
# an exact fit must not be refused because of the last bit of a double.
EPSILON = 1e-9
SECONDS_PER_DAY = 86_400


@dataclass(frozen=True, slots=True)
class WindowRule:
    """One limit of a tier, as configured."""

    name: str  # the config field: requests_per_minute, tokens_per_minute, ...
    label: str  # how messages name it: "tokens per minute"
    unit: Literal["requests", "tokens"]
    kind: WindowKind
    limit: int
    period: float  # seconds; buckets only (fixed windows follow the calendar)
    model: str | None = None  # a tier's window for one model's requests (None: all of them)


@dataclass(frozen=True, slots=True)
class WindowCharge:
    """A rule made concrete at one instant: what a store checks and charges."""

    name: str
    kind: WindowKind
    limit: int
    rate: float  # units drained per second (buckets); 0 for fixed windows
    window_id: int  # fixed: UTC day number or month number; buckets: 0
    window_end: float  # fixed: epoch seconds the window ends; buckets: 0
    cost: int  # units this request takes (or, in a settlement, the change: may be negative)
    model: str | None = None  # a window of one model's requests (None: of all of them)

    @property
    def key(self) -> str:
        """The window's name in a store: a model's windows are kept apart from the overall
        ones ("tokens_per_minute@smollm2-lora-a"), under the same principal, so one hold
        charges both atomically."""
        return self.name if self.model is None else f"{self.name}@{self.model}"


@dataclass(frozen=True, slots=True)
class WindowStatus:
    """What one window looks like to a client: the numbers behind x-ratelimit-* headers."""

    name: str
    limit: int
    used: int
    remaining: int
    reset_seconds: float  # until the window is back to its initial (empty) state
    model: str | None = None  # a window of one model's requests (None: of all of them)


RULE_SHAPES: dict[str, tuple[str, Literal["requests", "tokens"], WindowKind, float]] = {
    "requests_per_minute": ("requests per minute", "requests", "bucket", 60.0),
    "tokens_per_minute": ("tokens per minute", "tokens", "bucket", 60.0),
    "tokens_per_day": ("tokens per day", "tokens", "fixed", 0.0),
    "tokens_per_month": ("tokens per month", "tokens", "fixed", 0.0),
}


def make_rule(name: str, limit: int, model: str | None = None) -> WindowRule:
    label, unit, kind, period = RULE_SHAPES[name]
    return WindowRule(name, label, unit, kind, limit, period, model)


def day_window(now: float) -> tuple[int, float]:
    """(UTC day number, epoch seconds at its end)."""
    day = math.floor(now / SECONDS_PER_DAY)
    return day, float((day + 1) * SECONDS_PER_DAY)


def month_window(now: float) -> tuple[int, float]:
    """(month number since year 0, epoch seconds of the next 1st at 00:00 UTC)."""
    moment = datetime.fromtimestamp(now, tz=UTC)
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    end = calendar.timegm((year, month, 1, 0, 0, 0))
    return moment.year * 12 + moment.month - 1, float(end)


def charge_for(rule: WindowRule, cost: int, now: float) -> WindowCharge:
    if rule.kind == "bucket":
        rate = rule.limit / rule.period
        return WindowCharge(rule.name, "bucket", rule.limit, rate, 0, 0.0, cost, rule.model)
    window_id, end = day_window(now) if rule.name == "tokens_per_day" else month_window(now)
    return WindowCharge(rule.name, "fixed", rule.limit, 0.0, window_id, end, cost, rule.model)


def refill(used: float, last: float, now: float, rate: float) -> float:
    """A bucket's usage at `now` after draining since `last` (a clock behind drains none)."""
    return max(0.0, used - max(0.0, now - last) * rate)


def fits(used: float, cost: float, limit: int) -> bool:
    return used + cost <= limit + EPSILON


def can_ever_fit(charge: WindowCharge) -> bool:
    return charge.cost <= charge.limit


def retry_after(charge: WindowCharge, used: float, now: float) -> float | None:
    """Seconds until this window admits the charge (0: it does now); None: it never will."""
    if not can_ever_fit(charge):
        return None
    if fits(used, charge.cost, charge.limit):
        return 0.0
    if charge.kind == "bucket":
        return (used + charge.cost - charge.limit) / charge.rate
    return max(0.0, charge.window_end - now)


def status(charge: WindowCharge, used: float, now: float) -> WindowStatus:
    """The client's view of a window whose usage is `used` at `now`."""
    used = max(0.0, used)
    remaining = max(0, math.floor(charge.limit - used + EPSILON))
    if used <= EPSILON:
        reset = 0.0
    elif charge.kind == "bucket":
        reset = used / charge.rate
    else:
        reset = max(0.0, charge.window_end - now)
    used_units = math.ceil(used - EPSILON)
    return WindowStatus(charge.name, charge.limit, used_units, remaining, reset, charge.model)


def bucket_drain_seconds(used: float, rate: float) -> float:
    """How long a bucket's state must be kept: after that it is empty and may be forgotten."""
    return used / rate if rate > 0 else 0.0


def settle_delta(charge: WindowCharge, actual: int, held_for: float) -> int:
    """What settling a hold changes in one window: the real cost `actual` replaces the
    `charge.cost` held `held_for` seconds ago.

    A refilling bucket pools every request's units and drains them together: a refund may only
    take back what can still be in the bucket from this hold (its cost minus what has drained
    since), or it would erase units charged to newer requests. Fixed windows get the whole
    difference. The Lua scripts (stores/common.lua) mirror this.
    """
    delta = actual - charge.cost
    if charge.kind != "bucket" or delta >= 0:
        return delta
    still_held = max(0.0, charge.cost - max(0.0, held_for) * charge.rate)
    return -math.floor(min(-delta, still_held))
