"""The admission queue: at most `max_concurrency` requests hold a slot, at most `max_depth` wait.

A request takes a `Ticket` with `enqueue()`, awaits `ticket.wait()`, runs, and calls
`ticket.release()` (or uses `async with queue.slot(...)`). Waiters are ordered by
`fairness.FairQueue`. Expiry of waiters (max wait or the client's deadline) is driven by one
timer for the earliest expiry, or by calling `expire()` with an injected clock in tests.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from llmserve.admission.drain import DEFAULT_WINDOW_SECONDS, DrainRate, retry_after_seconds
from llmserve.admission.errors import (
    deadline_exceeded,
    queue_timeout,
    server_overloaded,
    shutting_down,
)
from llmserve.admission.fairness import FairQueue, Weight, default_weight
from llmserve.admission.observer import AdmissionObserver, NullObserver, RejectReason
from llmserve.admission.ticket import Slot, Ticket, TicketState
from llmserve.errors import APIError, InternalError

if TYPE_CHECKING:
    from llmserve.config import Config

Clock = Callable[[], float]


# Before the queue has seen a request finish: how long one is assumed to hold its slot.
PRIOR_REQUEST_SECONDS = 5.0

class AdmissionQueue:
    def __init__(
        self,
        max_concurrency: int,
        max_depth: int,
        max_wait_seconds: float,
        max_queued_tokens: int | None = None,
        *,
        clock: Clock = time.monotonic,
        observer: AdmissionObserver | None = None,
        weight: Weight = default_weight,
        drain_window_seconds: float = DEFAULT_WINDOW_SECONDS,
        auto_expire: bool = True,
    ) -> None:
        """`auto_expire=False` leaves expiry to explicit `expire()` calls (fake-clock tests)."""
        if max_concurrency < 1 or max_depth < 0 or max_wait_seconds <= 0:
            raise ValueError("need max_concurrency >= 1, max_depth >= 0, max_wait_seconds > 0")
        self.max_concurrency = max_concurrency
        self.max_depth = max_depth
        self.max_wait_seconds = max_wait_seconds
        self.max_queued_tokens = max_queued_tokens
        self._clock = clock
        self._observer: AdmissionObserver = observer or NullObserver()
        self._fair: FairQueue[Ticket] = FairQueue(weight)
        self._drain = DrainRate(clock(), drain_window_seconds)
        self._auto_expire = auto_expire
        self._in_flight = 0
        self._queued_tokens = 0
        self._closed = False
        self._expiries: list[tuple[float, int, Ticket]] = []  # heap; stale entries skipped
        self._sequence = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0

    @classmethod
    def from_config(cls, config: Config, **options: object) -> AdmissionQueue:
        """The queue the config describes; `options` are the keyword-only arguments above."""
        queue = config.queue
        return cls(
            config.max_concurrency,
            queue.max_depth,
            queue.max_wait_seconds,
            queue.max_queued_tokens,
            **options,  # type: ignore[arg-type]
        )

    # -- state for metrics, heartbeats and tests ------------------------------------------

    @property
    def depth(self) -> int:
        return len(self._fair)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    @property
    def closed(self) -> bool:
        return self._closed

    def clock(self) -> float:
        """The queue's clock: deadlines passed to `enqueue` are on this clock."""
        return self._clock()

    def drain_rate(self) -> float | None:
        """Slot releases per second over the recent window; None before any."""
        return self._drain.per_second(self._clock())

    def retry_after(self, completions_needed: int) -> int:
        """Retry-After (whole seconds, 1..max_wait) for `completions_needed` releases: from the
        measured drain rate, or before any completion from a prior of PRIOR_REQUEST_SECONDS per
        request and slot (never the queue's whole max wait just because nothing finished yet)."""
        estimate = self._drain.seconds_for(completions_needed, self._clock())
        if estimate is None:
            estimate = completions_needed * PRIOR_REQUEST_SECONDS / max(1, self.max_concurrency)
        return retry_after_seconds(estimate, self.max_wait_seconds)

    # -- the request path --------------------------------------------------------------------

    def enqueue(self, priority: int = 0, tokens: int = 0, deadline: float | None = None) -> Ticket:
        """Take a ticket: admitted at once when a slot is free and nobody waits, else queued.

        Raises ServiceUnavailable (server_overloaded with Retry-After, or shutting_down) when
        it cannot even wait, DeadlineExceeded when `deadline` (queue clock) has already passed.
        """
        if tokens < 0:
            raise ValueError("tokens must be >= 0")
        now = self._clock()
        self._check_door(priority, deadline, now)
        ticket = Ticket(self, priority, tokens, deadline, now)
        if self._in_flight < self.max_concurrency and not self._fair:
            self._admit(ticket, now)  # the fast path: no future, no timer, no yield
            return ticket
        reason = self._refusal(tokens)
        if reason is not None:
            self._observer.rejected(priority, reason, 0.0)
            raise server_overloaded(self.retry_after(self.depth + 1))
        self._wait_in_line(ticket, now)
        return ticket

    def slot(self, priority: int = 0, tokens: int = 0, deadline: float | None = None) -> Slot:
        return Slot(self, priority, tokens, deadline)

    def expire(self, now: float | None = None) -> int:
        """Reject every waiter whose max wait or deadline has come; return how many."""
        now = self._clock() if now is None else now
        expired = 0
        heap = self._expiries
        while heap and heap[0][0] <= now:
            _, _, ticket = heapq.heappop(heap)
            if ticket._state is TicketState.WAITING:
                self._time_out(ticket, now)
                expired += 1
        self._arm_timer()
        return expired

    def close(self) -> None:
        """Refuse new tickets and reject every waiter with shutting_down; holders keep slots."""
        self._closed = True
        for ticket in list(self._fair):
            self._reject(ticket, shutting_down(), "shutting_down", self._clock())

    # -- internals -------------------------------------------------------------------------

    def _position(self, ticket: Ticket) -> int:
        return self._fair.position(ticket.priority, ticket)

    def _seconds_for(self, completions: int) -> float | None:
        return self._drain.seconds_for(completions, self._clock())

    def _check_door(self, priority: int, deadline: float | None, now: float) -> None:
        if self._closed:
            self._observer.rejected(priority, "shutting_down", 0.0)
            raise shutting_down()
        if deadline is not None and deadline <= now:
            self._observer.rejected(priority, "deadline", 0.0)
            raise deadline_exceeded()

    def _refusal(self, tokens: int) -> RejectReason | None:
        depth = len(self._fair)
        if depth >= self.max_depth:
            return "queue_full"
        budget = self.max_queued_tokens
        # An empty queue takes any one request, or one bigger than the budget could never wait.
        if budget is not None and depth and self._queued_tokens + tokens > budget:
            return "queue_tokens"
        return None

    def _wait_in_line(self, ticket: Ticket, now: float) -> None:
        ticket._future = asyncio.get_running_loop().create_future()
        self._fair.push(ticket.priority, ticket, ticket)
        self._queued_tokens += ticket.tokens
        due = now + self.max_wait_seconds
        if ticket.deadline is not None:
            due = min(due, ticket.deadline)
        heapq.heappush(self._expiries, (due, next(self._sequence), ticket))
        self._arm_timer()

    def _admit(self, ticket: Ticket, now: float) -> None:
        ticket._state = TicketState.ADMITTED
        ticket.admitted_at = now
        self._in_flight += 1
        self._observer.admitted(ticket.priority, now - ticket.enqueued_at)

    def _admit_waiters(self, now: float) -> None:
        while self._in_flight < self.max_concurrency and self._fair:
            ticket = self._fair.pop()
            self._queued_tokens -= ticket.tokens
            future = ticket._future
            assert future is not None
            if future.cancelled():  # its task is being cancelled: it leaves instead
                ticket._state = TicketState.REJECTED
                self._observer.rejected(ticket.priority, "cancelled", now - ticket.enqueued_at)
                continue
            self._admit(ticket, now)
            future.set_result(None)
        self._forget_expiries_when_idle()

    def _release(self, ticket: Ticket) -> None:
        state = ticket._state
        if state is TicketState.WAITING:
            self._reject(ticket, _left_queue(), "cancelled", self._clock())
        elif state is TicketState.ADMITTED:
            now = self._clock()
            ticket._state = TicketState.RELEASED
            self._in_flight -= 1
            self._drain.record(now)
            self._admit_waiters(now)
            self._observer.released(ticket.priority, now - (ticket.admitted_at or now))

    def _abandon(self, ticket: Ticket) -> None:
        """The awaiting task was cancelled: leave the queue, or pass on a slot just granted."""
        self._release(ticket)

    def _time_out(self, ticket: Ticket, now: float) -> None:
        if ticket.deadline is not None and ticket.deadline <= now:
            self._reject(ticket, deadline_exceeded(), "deadline", now)
            return
        retry_after = self.retry_after(ticket.position)
        error = queue_timeout(now - ticket.enqueued_at, retry_after)
        self._reject(ticket, error, "queue_timeout", now)

    def _reject(
        self, ticket: Ticket, error: APIError | None, reason: RejectReason, now: float
    ) -> None:
        self._fair.remove(ticket.priority, ticket)
        self._queued_tokens -= ticket.tokens
        ticket._state = TicketState.REJECTED
        ticket._error = error
        future = ticket._future
        if future is not None and not future.done():
            future.set_result(None)  # wakes wait(), which raises ticket._error
        self._forget_expiries_when_idle()
        self._observer.rejected(ticket.priority, reason, now - ticket.enqueued_at)

    def _forget_expiries_when_idle(self) -> None:
        if not self._fair and self._expiries:
            self._expiries.clear()
            self._cancel_timer()

    def _arm_timer(self) -> None:
        heap = self._expiries
        while heap and heap[0][2]._state is not TicketState.WAITING:
            heapq.heappop(heap)
        if not heap or not self._auto_expire:
            self._cancel_timer()
            return
        due = heap[0][0]
        # A timer due no later than the head is kept even if its own entry went stale: when
        # it fires, expire() finds nothing and re-arms. One timer per max_wait, not per request.
        if self._timer is not None and self._timer_due <= due:
            return
        self._cancel_timer()
        delay = max(0.0, due - self._clock())
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)
        self._timer_due = due

    def _on_timer(self) -> None:
        self._timer = None
        self.expire()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _left_queue() -> InternalError:
    # Seen only by a task still waiting on a ticket that another task released.
    return InternalError("The request left the admission queue before it was admitted.")
