"""Token-aware rate limiting: windows per principal, reserved at admission, settled at the end.

windows.py   pure window arithmetic (buckets and UTC calendar windows)
tiers.py     tier + per-key overrides -> the windows that apply
limiter.py   Limiter and Reservation: reserve, settle, release, usage
denials.py   the 429s; headers.py the x-ratelimit-* headers
stores/      memory (default, diskcache-persisted) and redis (Lua scripts), by URL
"""

from llmserve.limits.limiter import Limiter, LimiterStats, Reservation
from llmserve.limits.stores import Store, StoreUnavailable, store_from_url
from llmserve.limits.tiers import TierPlan, validate_overrides
from llmserve.limits.windows import WindowStatus

__all__ = [
    "Limiter",
    "LimiterStats",
    "Reservation",
    "Store",
    "StoreUnavailable",
    "TierPlan",
    "WindowStatus",
    "store_from_url",
    "validate_overrides",
]
