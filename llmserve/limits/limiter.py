"""The limiter: reserve a request's worst case at admission, settle its real cost at the end.

    limiter = Limiter(config.limits, store_from_url(config.limits.store, config.limits.state_dir))
    reservation = await limiter.reserve(principal.id, principal.tier,
                                        principal.limit_overrides, prompt_tokens, max_tokens)
    try: ... generate ...
    finally: await limiter.settle(reservation, prompt_tokens, completion_tokens)

A request costs 1 in requests_per_minute and `prompt + weight * max_tokens` tokens in each
token window; settling replaces that with `prompt + weight * completion` (rounded up).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from llmserve.config import LimitsConfig
from llmserve.errors import ServiceUnavailable, retry_after_header
from llmserve.limits.blocks import RequestBlocks
from llmserve.limits.breaker import StoreBreaker
from llmserve.limits.denials import limit_reached, never_fits
from llmserve.limits.headers import rate_limit_headers
from llmserve.limits.stores.base import ReserveOutcome, Store, StoreUnavailable
from llmserve.limits.tiers import TierPlan, plan_tier
from llmserve.limits.windows import WindowCharge, WindowStatus, can_ever_fit, charge_for, status

log = logging.getLogger("llmserve.limits")

Clock = Callable[[], float]
_PLAN_CACHE_SIZE = 4096


@dataclass
class LimiterStats:
    """Counters for the metrics module to export (read them; the limiter only increments)."""

    store_errors: int = 0  # failed store calls (reserve, settle or usage)
    admitted_unchecked: int = 0  # admitted without a check: store down, on_store_error=open
    rejected_unavailable: int = 0  # 503 limiter_unavailable: store down, on_store_error=closed
    settlements_lost: int = 0  # settlements not applied because the store was down


@dataclass(eq=False, slots=True)
class Reservation:
    """What admission holds for one request; settle or release it exactly once."""

    principal_id: str
    plan: TierPlan
    charges: tuple[WindowCharge, ...]  # empty: nothing held (no limits, or unchecked)
    token_cost: int  # tokens held in each token window
    headers: dict[str, str] = field(default_factory=dict)  # x-ratelimit-* for the response
    finished: bool = False
    reserved_at: float = 0.0  # the limiter clock when the hold was taken

    def _claim(self) -> bool:
        """True the first time only: settling twice must not refund twice."""
        if self.finished:
            return False
        self.finished = True
        return True


@dataclass(frozen=True, slots=True)
class Settlement:
    """The store update that settles one reservation (Limiter.settlement, then .apply)."""

    principal_id: str
    corrections: tuple[WindowCharge, ...]
    now: float


class Limiter:
    def __init__(
        self,
        config: LimitsConfig,
        store: Store,
        clock: Clock = time.time,
        *,
        store_retry_seconds: float = 1.0,
    ) -> None:
        self.config = config
        self.store = store
        self.stats = LimiterStats()
        self._clock = clock
        self._breaker = StoreBreaker(clock, store_retry_seconds)
        self._plans: dict[tuple[str | None, frozenset[tuple[str, int]]], TierPlan] = {}
        self.blocks = RequestBlocks()

    @property
    def never_suspends(self) -> bool:
        return bool(getattr(self.store, "never_suspends", False))

    def plan(self, tier_name: str | None, overrides: Mapping[str, int]) -> TierPlan:
        """The tier as applied (limits, weight, default_max_tokens, priority); cached."""
        key = (tier_name, frozenset(overrides.items()))
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= _PLAN_CACHE_SIZE:
                self._plans.clear()
            plan = self._plans[key] = plan_tier(self.config, tier_name, overrides)
        return plan

    def refuse_early(
        self, principal_id: str, tier_name: str | None, overrides: Mapping[str, int]
    ) -> None:
        """Raise RateLimited (429) at once if this caller's requests_per_minute is still spent
        since a refusal: before its request is even read (blocks.py)."""
        if len(self.blocks):
            self.blocks.check(principal_id, self.plan(tier_name, overrides), self._clock())

    async def reserve(
        self,
        principal_id: str,
        tier_name: str | None,
        overrides: Mapping[str, int],
        prompt_tokens: int,
        max_tokens: int,
    ) -> Reservation:
        """Hold the request's worst case in every window, or raise RateLimited (429) /
        ServiceUnavailable (503, limiter_unavailable)."""
        plan = self.plan(tier_name, overrides)
        cost = plan.token_cost(prompt_tokens, max_tokens)
        if not plan.rules:
            return Reservation(principal_id, plan, (), cost)
        now = self._clock()
        charges = tuple(
            charge_for(rule, 1 if rule.unit == "requests" else cost, now) for rule in plan.rules
        )
        for charge in charges:
            if not can_ever_fit(charge):
                raise never_fits(charge)
        outcome = await self._store_reserve(principal_id, charges, now)
        if outcome is None:
            return Reservation(principal_id, plan, (), cost)
        if not outcome.admitted:
            self.blocks.note_refusal(principal_id, plan, charges, outcome.used, now)
            raise limit_reached(charges, outcome.used, now)
        after = [status(c, u + c.cost, now) for c, u in zip(charges, outcome.used, strict=True)]
        headers = rate_limit_headers(after)
        return Reservation(principal_id, plan, charges, cost, headers, reserved_at=now)

    async def settle(
        self, reservation: Reservation, prompt_tokens: int, completion_tokens: int
    ) -> None:
        """Replace the hold by the real cost. Idempotent; never raises for a store failure
        (the hold then stays charged: the error is on the caller's side of the limit)."""
        settlement = self.settlement(reservation, prompt_tokens, completion_tokens)
        if settlement is not None:
            await self.apply(settlement)

    def settlement(
        self, reservation: Reservation, prompt_tokens: int, completion_tokens: int
    ) -> Settlement | None:
        """settle's first half, without I/O: claim the reservation and work out the store
        update, or None when there is none to make (often: a request that used what it held)."""
        if not reservation._claim():
            return None
        delta = reservation.plan.token_cost(prompt_tokens, completion_tokens)
        delta -= reservation.token_cost
        if delta == 0:
            return None
        now = self._clock()
        corrections = tuple(
            dataclasses.replace(c, cost=cost)
            for c in reservation.charges
            if c.name != "requests_per_minute"  # a request counts once, whatever happened
            and (cost := _correction(c, delta, now - reservation.reserved_at))
        )
        return Settlement(reservation.principal_id, corrections, now) if corrections else None

    async def apply(self, settlement: Settlement) -> None:
        """settle's second half: send the update to the store (never raises for its failure)."""
        if not self._breaker.allows_call():
            self.stats.settlements_lost += 1
            return
        try:
            await self.store.adjust(settlement.principal_id, settlement.corrections,
                                    settlement.now)  # fmt: skip
        except StoreUnavailable as exc:
            self.stats.settlements_lost += 1
            self._store_failed("settle", exc)
        else:
            self._store_ok()

    async def release(self, reservation: Reservation) -> None:
        """Refund every token of a request that never reached the engine (e.g. queue timeout).

        Same as settle(reservation, 0, 0): the request itself still counts toward
        requests_per_minute, so a client cannot dodge it by overfilling the queue.
        """
        await self.settle(reservation, 0, 0)

    async def usage(
        self, principal_id: str, tier_name: str | None, overrides: Mapping[str, int]
    ) -> list[WindowStatus]:
        """Each window's usage, remaining and reset for one principal, charging nothing."""
        plan = self.plan(tier_name, overrides)
        if not plan.rules:
            return []
        now = self._clock()
        charges = [charge_for(rule, 0, now) for rule in plan.rules]
        try:
            used = await self.store.peek(principal_id, charges, now)
        except StoreUnavailable as exc:
            self._store_failed("usage", exc)
            raise self._unavailable() from None
        self._store_ok()
        return [status(c, u, now) for c, u in zip(charges, used, strict=True)]

    async def close(self) -> None:
        await self.store.close()

    async def _store_reserve(
        self, principal_id: str, charges: tuple[WindowCharge, ...], now: float
    ) -> ReserveOutcome | None:
        """The store's answer, or None to admit unchecked (store down, policy open)."""
        if self._breaker.allows_call():
            try:
                outcome = await self.store.reserve(principal_id, charges, now)
            except StoreUnavailable as exc:
                self._store_failed("reserve", exc)
            else:
                self._store_ok()
                return outcome
        if self.config.on_store_error == "open":
            self.stats.admitted_unchecked += 1
            log.debug("limiter store down: admitting %s unchecked", principal_id)
            return None
        self.stats.rejected_unavailable += 1
        raise self._unavailable()

    def _unavailable(self) -> ServiceUnavailable:
        return ServiceUnavailable(
            "The rate limiter is temporarily unavailable; please retry shortly.",
            code="limiter_unavailable",
            headers=retry_after_header(self._breaker.retry_in()),
        )

    def _store_failed(self, operation: str, exc: StoreUnavailable) -> None:
        self.stats.store_errors += 1
        if self._breaker.record_failure():
            log.error(
                "limiter store failed during %s (%s); on_store_error=%s until it is back",
                operation,
                exc,
                self.config.on_store_error,
            )

    def _store_ok(self) -> None:
        if self._breaker.record_success():
            log.warning("limiter store is reachable again; limits are enforced")


def _correction(charge: WindowCharge, delta: int, elapsed: float) -> int:
    """What settlement changes in one window. A refilling bucket pools every request's tokens
    and drains them together: a refund may only take back what can still be in the bucket from
    this reservation (its cost minus what has drained since), or it would erase tokens charged
    to newer requests. Fixed windows get the whole difference."""
    if charge.kind != "bucket" or delta >= 0:
        return delta
    still_held = max(0.0, charge.cost - max(0.0, elapsed) * charge.rate)
    return -math.floor(min(-delta, still_held))
