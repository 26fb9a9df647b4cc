"""The limiter's state store: atomic reserve, settle and peek over named windows.

A store knows nothing of tiers or HTTP: it gets the windows of one principal, each with its
limit and the units to charge, and the caller's clock reading `now` (so every process that
shares a store uses its own clock, and tests inject one).

A reservation is a *hold*, named by an id the caller chooses. Settling replaces what the hold
took by the real cost, exactly once per id, whatever order the calls arrive in:

- hold present: each window gets `actual - held` (a bucket refunds at most what has not
  drained since; windows.settle_delta);
- hold unknown (its reserve never ran, or its lease ran out and it was refunded): each window
  gets `actual`, so a request admitted without a check is still charged what it used;
- hold already settled (or cancelled before its reserve ran): nothing, and a reserve that
  arrives after its settlement charges nothing either.

A store shared by processes (`leases = True`) refunds the tokens of a hold whose lease ran out
(its process died): the request still counts once in requests_per_minute. The caller renews
the leases of its live holds. A store private to one process keeps no hold past that process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from llmserve.errors import LLMServeError
from llmserve.limits.windows import WindowCharge


class StoreUnavailable(LLMServeError):
    """The store could not be reached or failed; the limiter applies limits.on_store_error.

    `maybe_applied`: the call may have run in the store although it failed here (its reply
    was lost, or came too late); False when it certainly did not (no connection)."""

    def __init__(self, message: str, *, maybe_applied: bool = True) -> None:
        super().__init__(message)
        self.maybe_applied = maybe_applied


@dataclass(frozen=True, slots=True)
class Hold:
    """One reservation's claim: the windows it charges (each charge's cost: units held)."""

    id: str  # unique per request ("" for a reservation that holds no tokens: nothing kept)
    charges: tuple[WindowCharge, ...]
    reserved_at: float  # the caller's clock when it was taken
    lease_until: float  # shared stores refund its tokens after this unless renewed
    token_windows: tuple[bool, ...]  # per charge: counts tokens (refunded on expiry)


@dataclass(frozen=True, slots=True)
class ReserveOutcome:
    admitted: bool
    used: tuple[float, ...]  # per window, in order: usage at `now` before this request
    # per window: the part of `used` that in-flight holds of fixed windows account for (they
    # may be refunded when those requests settle; buckets report 0)
    held: tuple[float, ...] = ()


@runtime_checkable
class Store(Protocol):
    @property
    def leases(self) -> bool:
        """True when holds outlive the process that made them unless renewed (shared store)."""
        ...

    async def reserve(self, principal_id: str, hold: Hold) -> ReserveOutcome:
        """Charge every window of the hold if every window fits, else charge none:
        atomically. `now` is hold.reserved_at."""
        ...

    async def settle(
        self, principal_id: str, hold: Hold, actual: Sequence[int], now: float
    ) -> None:
        """Replace the hold by `actual` units per window (see the module docstring), never
        below zero. A fixed window that has since been replaced by a newer one is left
        alone. Idempotent per hold id."""
        ...

    async def renew(self, holds: Sequence[tuple[str, Hold]], until: float) -> None:
        """Extend the leases of these (principal_id, hold) to `until`; a hold that has
        already expired stays expired."""
        ...

    async def peek(
        self, principal_id: str, charges: Sequence[WindowCharge], now: float
    ) -> tuple[float, ...]:
        """Usage of each window at `now`, charging nothing."""
        ...

    async def close(self) -> None: ...
