"""Callers whose requests_per_minute is spent, remembered so their next requests are refused
before anything is spent on them (the body is not even read).

Only that window is remembered: every request costs exactly one request in it, settlement never
gives one back, and a bucket drains no faster than the clock, so a caller refused there cannot fit
before the computed time, whichever server instance it calls (other instances only add usage).
A token window's refusal depends on the request's size and on refunds of other requests, so those
always go to the store.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from llmserve.errors import RateLimited
from llmserve.limits.denials import limit_reached
from llmserve.limits.windows import WindowCharge, refill, retry_after

REQUESTS_WINDOW = "requests_per_minute"
MAX_BLOCKED = 65_536  # callers remembered at once; beyond that the expired ones are dropped
# A refusal's text and headers are reused for this long. They only err on the safe side: made a
# moment earlier, they show a longer wait and fewer remaining, never a retry that comes too soon.
REUSE_SECONDS = 0.1


@dataclass(slots=True)
class Block:
    plan: object  # the tier plan it was computed for: a changed tier or override ends the block
    until: float  # the limiter clock at which one more request fits
    charges: tuple[WindowCharge, ...]  # as refused, token costs zeroed (the next size is unknown)
    used: tuple[float, ...]
    at: float
    last: RateLimited | None = None  # the latest refusal made from this block
    last_at: float = 0.0

    def refusal(self, now: float) -> RateLimited:
        """A new 429 as of `now`, its message and headers reused within REUSE_SECONDS."""
        last = self.last
        if last is None or now - self.last_at >= REUSE_SECONDS:
            used = [refill(u, self.at, now, c.rate) if c.kind == "bucket" else u
                    for c, u in zip(self.charges, self.used, strict=True)]  # fmt: skip
            last = self.last = limit_reached(self.charges, used, now)
            self.last_at = now
        error = RateLimited(last.message, headers=last.headers)  # a copy of them
        error.limit, error.limit_model = last.limit, last.limit_model
        return error


class RequestBlocks:
    def __init__(self) -> None:
        self._blocks: dict[str, Block] = {}

    def __len__(self) -> int:
        return len(self._blocks)

    def note_refusal(
        self, principal_id: str, plan: object, charges: Sequence[WindowCharge],
        used: Sequence[float], now: float,
    ) -> None:  # fmt: skip
        """Remember a store refusal if the tier's own requests window was full (a model's
        window blocks nothing: the caller's requests for other models may still fit)."""
        overall = [(c, u) for c, u in zip(charges, used, strict=True) if c.model is None]
        for charge, u in overall:
            if charge.name == REQUESTS_WINDOW:
                wait = retry_after(charge, u, now)
                if wait:  # None (never fits) is refused before the store; 0 fits
                    block = Block(plan, now + wait, _requests_only([c for c, _ in overall]),
                                  tuple(u for _, u in overall), now)  # fmt: skip
                    self._add(principal_id, block)
                return

    def check(self, principal_id: str, plan: object, now: float) -> None:
        """Raise the 429 of a caller still blocked at `now`, with its headers as of `now`."""
        block = self._blocks.get(principal_id)
        if block is None:
            return
        if now >= block.until or block.plan is not plan:
            del self._blocks[principal_id]
            return
        # raised where it is made: an exception held in a local of the raising frame would make a
        # reference cycle (exception -> traceback -> frame -> exception) for the collector
        raise block.refusal(now)

    def _add(self, principal_id: str, block: Block) -> None:
        if len(self._blocks) >= MAX_BLOCKED:
            self._blocks = {p: b for p, b in self._blocks.items() if b.until > block.at}
            if len(self._blocks) >= MAX_BLOCKED:
                self._blocks.clear()
        self._blocks[principal_id] = block


def _requests_only(charges: Sequence[WindowCharge]) -> tuple[WindowCharge, ...]:
    """The refused charges with token costs zeroed, so the 429 names the requests window."""
    return tuple(c if c.name == REQUESTS_WINDOW else dataclasses.replace(c, cost=0)
                 for c in charges)  # fmt: skip
