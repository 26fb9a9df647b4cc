"""The limiter: reserve a request's worst case at admission, settle its real cost at the end.

    limiter = Limiter(config.limits, store_from_url(config.limits.store, config.limits.state_dir))
    reservation = await limiter.reserve(principal.id, principal.tier,
                                        principal.limit_overrides, prompt_tokens, max_tokens)
    try: ... generate ...
    finally: await limiter.settle(reservation, prompt_tokens, completion_tokens)

A request costs 1 in requests_per_minute and `prompt + weight * max_tokens` tokens in each
token window; settling replaces that with `prompt + weight * completion` (rounded up).

A tier's windows for one model (`models:`) are charged by the same hold as its own windows,
when the request runs that model (`reserve(..., model=)`: the base model or an adapter; an
alias is resolved to it before): one store call admits the request only if both fit, and one
settlement, exactly once by the hold's id, settles both. The store keeps them apart from the
overall windows by their key (WindowCharge.key), under the same principal.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from llmserve.config import LimitsConfig
from llmserve.errors import ConfigError, ServiceUnavailable, retry_after_header
from llmserve.limits.blocks import RequestBlocks
from llmserve.limits.breaker import StoreBreaker
from llmserve.limits.denials import limit_reached, never_fits
from llmserve.limits.headers import rate_limit_headers
from llmserve.limits.holds import HoldKeeper
from llmserve.limits.stores.base import Hold, ReserveOutcome, Store, StoreUnavailable
from llmserve.limits.tiers import TierPlan, plan_tier
from llmserve.limits.windows import (
    WindowStatus,
    can_ever_fit,
    charge_for,
    retry_after,
    status,
)

log = logging.getLogger("llmserve.limits")

Clock = Callable[[], float]
_PLAN_CACHE_SIZE = 4096
# Shadow windows are kept under the principal's id with this suffix (never a real id's).
SHADOW_SUFFIX = "\x1fshadow"


@dataclass
class LimiterStats:
    """Counters for the metrics module to export (read them; the limiter only increments)."""

    store_errors: int = 0  # failed store calls (reserve, settle or usage)
    admitted_unchecked: int = 0  # admitted without a check: store down, on_store_error=open
    rejected_unavailable: int = 0  # 503 limiter_unavailable: store down, on_store_error=closed
    settlements_lost: int = 0  # settlements dropped for good (backlog full, or shut down)
    settlements_deferred: int = 0  # settlements kept to send again once the store is back
    settlements_pending: int = 0  # of those, not sent yet (a gauge)
    # requests a tier's shadow limits would have refused, by (tier, window); never enforced
    shadow_refusals: dict[tuple[str, str], int] = field(default_factory=dict)


@dataclass(eq=False, slots=True)
class Reservation:
    """What admission holds for one request; settle or release it exactly once."""

    principal_id: str
    plan: TierPlan
    hold: Hold | None  # None: nothing held (the tier has no limits)
    token_cost: int  # tokens held in each token window
    headers: dict[str, str] = field(default_factory=dict)  # x-ratelimit-* for the response
    checked: bool = True  # False: admitted without the store (down, on_store_error=open)
    finished: bool = False
    shadow: Reservation | None = None  # the hold in the tier's shadow windows, if it fit
    shadow_refused: str | None = None  # the shadow window that would have refused it

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
    hold: Hold
    actual: tuple[int, ...]  # per window: what the request really cost
    shadow: Settlement | None = None  # the same request's settlement in its shadow windows


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
        self.clock = clock
        self.breaker = StoreBreaker(clock, store_retry_seconds)
        self._plans: dict[tuple[str | None, frozenset[tuple[str, int]]], TierPlan] = {}
        self.blocks = RequestBlocks()
        self.holds = HoldKeeper(self, config.hold_lease_seconds)

    @property
    def never_suspends(self) -> bool:
        return bool(getattr(self.store, "never_suspends", False))

    def reconfigure(self, config: LimitsConfig) -> None:
        """New tiers and limits for the requests that reserve from now on (server/reload.py);
        a reservation already made settles under the plan it was made with."""
        if (config.store, config.state_dir) != (self.config.store, self.config.state_dir):
            raise ConfigError("limits.store and limits.state_dir need a restart")
        self.config = config
        self._plans = {}
        self.holds.lease_seconds = config.hold_lease_seconds

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
            self.blocks.check(principal_id, self.plan(tier_name, overrides), self.clock())

    async def reserve(
        self,
        principal_id: str,
        tier_name: str | None,
        overrides: Mapping[str, int],
        prompt_tokens: int,
        max_tokens: int,
        model: str | None = None,
    ) -> Reservation:
        """Hold the request's worst case in every window (the tier's, and those of `model`, the
        model it runs, if the tier limits it), or raise RateLimited (429) /
        ServiceUnavailable (503, limiter_unavailable)."""
        plan = self.plan(tier_name, overrides)
        cost = plan.token_cost(prompt_tokens, max_tokens)
        rules = plan.rules_for(model)
        if not rules:
            return Reservation(principal_id, plan, None, cost)
        now = self.clock()
        charges = tuple(
            charge_for(rule, 1 if rule.unit == "requests" else cost, now) for rule in rules
        )
        for charge in charges:
            if not can_ever_fit(charge):
                raise never_fits(charge)
        hold = self.holds.new(charges, rules, now)
        outcome = await self._store_reserve(principal_id, hold)
        if outcome is None:
            return Reservation(principal_id, plan, hold, cost, checked=False)
        if not outcome.admitted:
            self.blocks.note_refusal(principal_id, plan, charges, outcome.used, now)
            raise limit_reached(charges, outcome.used, now, outcome.held)
        self.holds.track(principal_id, hold)
        after = [status(c, u + c.cost, now) for c, u in zip(charges, outcome.used, strict=True)]
        reservation = Reservation(principal_id, plan, hold, cost, rate_limit_headers(after))
        if plan.shadow_rules:
            await self._reserve_shadow(reservation, now)
        return reservation

    async def _reserve_shadow(self, reservation: Reservation, now: float) -> None:
        """Count the request against the tier's shadow limits as if they were enforced: hold
        it there if it fits, else note which window would have refused it. Never refuses, and
        a store failure here only skips the count."""
        plan, cost = reservation.plan, reservation.token_cost
        shadow_id = reservation.principal_id + SHADOW_SUFFIX
        charges = tuple(charge_for(rule, 1 if rule.unit == "requests" else cost, now)
                        for rule in plan.shadow_rules)  # fmt: skip
        hold = self.holds.new(charges, plan.shadow_rules, now)
        try:
            outcome = await self.store.reserve(shadow_id, hold)
        except StoreUnavailable:
            return
        if outcome.admitted:
            self.holds.track(shadow_id, hold)
            reservation.shadow = Reservation(shadow_id, plan, hold, cost)
            return
        window = next((c.name for c, u in zip(charges, outcome.used, strict=True)
                       if retry_after(c, u, now) != 0), charges[0].name)  # fmt: skip
        reservation.shadow_refused = window
        key = (plan.name, window)
        self.stats.shadow_refusals[key] = self.stats.shadow_refusals.get(key, 0) + 1

    async def settle(
        self, reservation: Reservation, prompt_tokens: int, completion_tokens: int
    ) -> None:
        """Replace the hold by the real cost. Idempotent; never raises for a store failure
        (the settlement is then sent again once the store is back)."""
        settlement = self.settlement(reservation, prompt_tokens, completion_tokens)
        if settlement is not None:
            await self.apply(settlement)

    def settlement(
        self, reservation: Reservation, prompt_tokens: int, completion_tokens: int
    ) -> Settlement | None:
        """settle's first half, without I/O: claim the reservation and work out the store
        update, or None when there is none to make."""
        hold = reservation.hold
        if not reservation._claim() or hold is None:
            return None
        shadow = None
        if reservation.shadow is not None:
            shadow = self.settlement(reservation.shadow, prompt_tokens, completion_tokens)
        tokens = reservation.plan.token_cost(prompt_tokens, completion_tokens)
        actual = _actual(hold, tokens)
        if not hold.id and all(a == c.cost for a, c in zip(actual, hold.charges, strict=True)):
            return shadow  # nothing kept in the store and nothing to change: no round trip
        return Settlement(reservation.principal_id, hold, actual, shadow)

    async def apply(self, settlement: Settlement) -> None:
        """settle's second half: send the update to the store. Never raises for its failure:
        the settlement is kept and sent again once the store answers (exactly once, by the
        hold's id)."""
        self.holds.untrack(settlement.hold.id)
        if not self.breaker.allows_call():
            self.holds.defer(settlement)
        else:
            try:
                await self.store.settle(settlement.principal_id, settlement.hold,
                                        settlement.actual, self.clock())  # fmt: skip
            except StoreUnavailable as exc:
                self.holds.defer(settlement)
                self.store_failed("settle", exc)
            else:
                self.store_ok()
        if settlement.shadow is not None:
            await self.apply(settlement.shadow)

    async def release(self, reservation: Reservation) -> None:
        """Refund every token of a request that never reached the engine (e.g. queue timeout).

        Same as settle(reservation, 0, 0): the request itself still counts toward
        requests_per_minute, so a client cannot dodge it by overfilling the queue.
        """
        await self.settle(reservation, 0, 0)

    async def usage(
        self, principal_id: str, tier_name: str | None, overrides: Mapping[str, int]
    ) -> list[WindowStatus]:
        """Each window's usage, remaining and reset for one principal, charging nothing: the
        tier's own windows, then each model's."""
        plan = self.plan(tier_name, overrides)
        rules = plan.all_rules
        if not rules:
            return []
        now = self.clock()
        charges = [charge_for(rule, 0, now) for rule in rules]
        try:
            used = await self.store.peek(principal_id, charges, now)
        except StoreUnavailable as exc:
            self.store_failed("usage", exc)
            raise self._unavailable() from None
        self.store_ok()
        return [status(c, u, now) for c, u in zip(charges, used, strict=True)]

    async def close(self) -> None:
        await self.holds.close()
        await self.store.close()

    async def _store_reserve(self, principal_id: str, hold: Hold) -> ReserveOutcome | None:
        """The store's answer, or None to admit unchecked (store down, policy open)."""
        if self.breaker.allows_call():
            try:
                outcome = await self.store.reserve(principal_id, hold)
            except StoreUnavailable as exc:
                self.store_failed("reserve", exc)
                if exc.maybe_applied and self.config.on_store_error == "closed":
                    # The script may have run (its reply lost, or Redis paused): cancel the
                    # hold once the store is back, so a refused request is never charged.
                    self.holds.defer(Settlement(principal_id, hold, (0,) * len(hold.charges)))
            else:
                self.store_ok()
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
            headers=retry_after_header(self.breaker.retry_in()),
        )

    def store_failed(self, operation: str, exc: StoreUnavailable) -> None:
        self.stats.store_errors += 1
        if self.breaker.record_failure():
            log.error(
                "limiter store failed during %s (%s); on_store_error=%s until it is back",
                operation,
                exc,
                self.config.on_store_error,
            )

    def store_ok(self) -> None:
        if self.breaker.record_success():
            log.warning("limiter store is reachable again; limits are enforced")
        self.holds.store_answered()


def _actual(hold: Hold, tokens: int) -> tuple[int, ...]:
    """What a request really cost in each window: `tokens` in token windows; a request counts
    once in requests_per_minute, whatever happened."""
    return tuple(
        tokens if counts_tokens else charge.cost
        for charge, counts_tokens in zip(hold.charges, hold.token_windows, strict=True)
    )
