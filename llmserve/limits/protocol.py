"""What the gateway needs from a rate limiter: the seam between the request path and
`limits.limiter.Limiter` (tests may hand the gateway anything of this shape)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from llmserve.config import LimitsConfig
from llmserve.limits.limiter import Reservation, Settlement
from llmserve.limits.tiers import TierPlan


class RateLimiter(Protocol):
    @property
    def never_suspends(self) -> bool:
        """True when reserve/apply never yield to the event loop (an in-process store): the
        gateway then needs no task to shield them from a cancelled request."""

    def plan(self, tier_name: str | None, overrides: Mapping[str, int]) -> TierPlan: ...

    def reconfigure(self, config: LimitsConfig) -> None:
        """New tiers and limits for the requests that reserve from now on."""

    def refuse_early(
        self, principal_id: str, tier_name: str | None, overrides: Mapping[str, int]
    ) -> None:
        """Raise RateLimited (429) before the request is read, if the caller is blocked."""

    async def reserve(
        self,
        principal_id: str,
        tier_name: str | None,
        overrides: Mapping[str, int],
        prompt_tokens: int,
        max_tokens: int,
        model: str | None = None,
    ) -> Reservation:
        """Hold the worst case in every window (the tier's, and `model`'s own if the tier has
        windows for the model the request runs), or raise RateLimited / ServiceUnavailable."""

    def settlement(
        self, reservation: Reservation, prompt_tokens: int, completion_tokens: int
    ) -> Settlement | None:
        """Claim the reservation and work out the store update, without I/O (None: none)."""

    async def apply(self, settlement: Settlement) -> None: ...

    async def release(self, reservation: Reservation) -> None:
        """Refund every token of a request that never reached the engine."""
