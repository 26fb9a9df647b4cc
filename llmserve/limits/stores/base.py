"""The limiter's state store: atomic reserve, adjust (settle) and peek over named windows.

A store knows nothing of tiers or HTTP: it gets the windows of one principal, each with its
limit and the units to charge, and the caller's clock reading `now` (so every process that
shares a store uses its own clock, and tests inject one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from llmserve.errors import LLMServeError
from llmserve.limits.windows import WindowCharge


class StoreUnavailable(LLMServeError):
    """The store could not be reached or failed; the limiter applies limits.on_store_error."""


@dataclass(frozen=True, slots=True)
class ReserveOutcome:
    admitted: bool
    used: tuple[float, ...]  # per window, in order: usage at `now` before this request


@runtime_checkable
class Store(Protocol):
    async def reserve(
        self, principal_id: str, charges: Sequence[WindowCharge], now: float
    ) -> ReserveOutcome:
        """Charge every window if every window fits, else charge none: atomically."""
        ...

    async def adjust(self, principal_id: str, charges: Sequence[WindowCharge], now: float) -> None:
        """Add each charge's cost (negative: a refund) to its window, never below zero.

        A fixed window that has since been replaced by a newer one is left alone.
        """
        ...

    async def peek(
        self, principal_id: str, charges: Sequence[WindowCharge], now: float
    ) -> tuple[float, ...]:
        """Usage of each window at `now`, charging nothing."""
        ...

    async def close(self) -> None: ...
