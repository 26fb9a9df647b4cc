"""The admission queue: at most `max_concurrency` requests hold a slot, at most `max_depth` wait.

A request takes a `Ticket` with `enqueue()`, awaits `ticket.wait()`, runs, and calls
`ticket.release()` (or uses `async with queue.slot(...)`). Waiters are ordered by
`fairness.FairQueue`. Expiry of waiters (max wait, the client's deadline, or the time to first
token it was promised) is driven by one timer for the earliest expiry, or by calling
`expire()` with an injected clock in tests.

Two rules keep the promise under overload:

- **Refuse at once what cannot meet its objective.** A request that would wait joins only if
  its predicted time to first token (predict.py: the wait for a slot, from the drain rate and
  the requests ahead of it, plus its prefill) fits its `ttft_slo` and its deadline; otherwise
  it gets 503 `server_overloaded` at the door, with a Retry-After from the same prediction.
  A request that waits anyway past its objective (the prediction was wrong) is sent away then.
- **Keep room for the top priority.** With `reserved_slots` / `reserved_places`, requests below
  `top_priority` may not take the last slots or queue places while the top priority is in use
  (a request of it came within RESERVE_ACTIVE_SECONDS): a flood of a lower tier cannot push
  the top tier's requests behind it, and a server the top tier does not use keeps all its
  capacity for the others.
- **Keep the top tier's prefill step small.** With `lower_prefills`, at most that many
  requests below the top priority are in their prefill at once (admitted, first token not
  yet out) while the top priority is in use, and none starts while a top-priority request is
  in its prefill. An engine that runs each prompt whole in one step (vLLM on CPU, without
  chunked prefill) puts every prompt admitted together into one step, and a top-tier request
  that arrives meanwhile waits for that step, then shares the next: the lower tiers'
  prefills are spread one step apart instead. Top-tier prefills that keep overlapping cannot
  starve the lower tiers: each one that ends lets one lower prefill start beside the rest.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypedDict

from llmserve.admission.drain import DEFAULT_WINDOW_SECONDS, DrainRate, retry_after_seconds
from llmserve.admission.errors import (
    deadline_exceeded,
    queue_timeout,
    server_overloaded,
    shutting_down,
)
from llmserve.admission.fairness import FairQueue, Weight, default_weight
from llmserve.admission.observer import AdmissionObserver, NullObserver, RejectReason
from llmserve.admission.predict import (
    DOOR_SHARE,
    PRIOR_REQUEST_SECONDS,
    Prediction,
    PrefillModel,
    bound_drain_rate,
    requests_ahead,
    wait_seconds,
)
from llmserve.admission.ticket import Slot, Ticket, TicketState
from llmserve.errors import APIError, InternalError

if TYPE_CHECKING:
    from llmserve.config import Config

Clock = Callable[[], float]

# The room kept for the top priority is kept this long after its last request (idle: none).
RESERVE_ACTIVE_SECONDS = 60.0


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
        top_priority: int = 0,
        reserved_slots: int = 0,
        reserved_places: int = 0,
        lower_prefills: int | None = None,
    ) -> None:
        """`auto_expire=False` leaves expiry to explicit `expire()` calls (fake-clock tests)."""
        if max_concurrency < 1 or max_depth < 0 or max_wait_seconds <= 0:
            raise ValueError("need max_concurrency >= 1, max_depth >= 0, max_wait_seconds > 0")
        if not 0 <= reserved_slots < max_concurrency or not 0 <= reserved_places <= max_depth:
            raise ValueError("reserved slots and places must leave some for everyone")
        if lower_prefills is not None and lower_prefills < 1:
            raise ValueError("lower_prefills must be >= 1 (or None: no limit)")
        self.max_concurrency = max_concurrency
        self.max_depth = max_depth
        self.max_wait_seconds = max_wait_seconds
        self.max_queued_tokens = max_queued_tokens
        self._clock = clock
        self._observer: AdmissionObserver = observer or NullObserver()
        self._fair: FairQueue[Ticket] = FairQueue(weight)
        self._drain = DrainRate(clock(), drain_window_seconds)
        self._lower_drain = DrainRate(clock(), drain_window_seconds)  # below the top priority
        self._auto_expire = auto_expire
        self._in_flight = 0
        self._queued_tokens = 0
        self._closed = False
        self._expiries: list[tuple[float, int, Ticket]] = []  # heap; stale entries skipped
        self._sequence = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0
        self._weight = weight
        self._prefill = PrefillModel()
        self.top_priority = top_priority
        self.reserved_slots = reserved_slots
        self.reserved_places = reserved_places
        self.lower_prefills = lower_prefills
        self._lower_prefilling = 0  # admitted below the top priority, no first token yet
        self._top_prefilling = 0  # admitted at the top priority, no first token yet
        self._lower_passes_top = False  # a lower prefill may start beside top-tier ones
        self._whole_prompt_steps = False  # what the engine said (engine_started)
        self._top_seen_at: float | None = None  # the last request of the top priority
        self._busy_since: float | None = None  # when the slots last went from none to some used

    def reconfigure(self, config: Config) -> None:
        """New queue settings (server/reload.py). Requests holding a slot keep it; if there
        are more slots now, waiters take them at once; fewer, and the excess drains."""
        settings = _settings(config)
        self.max_concurrency = config.max_concurrency
        self.max_depth = config.queue.max_depth
        self.max_wait_seconds = config.queue.max_wait_seconds
        self.max_queued_tokens = config.queue.max_queued_tokens
        self.top_priority = settings["top_priority"]
        self.reserved_slots = settings["reserved_slots"]
        self.reserved_places = settings["reserved_places"]
        self.lower_prefills = lower_prefills(config, whole_prompt_steps=self._whole_prompt_steps)
        if self._fair:
            self._admit_waiters(self._clock())

    @classmethod
    def from_config(cls, config: Config, **options: object) -> AdmissionQueue:
        """The queue the config describes; `options` are the keyword-only arguments above.

        With tiers of different priorities, `queue.reserved_share` of the slots and queue
        places are kept for the highest, and `queue.lower_prefills` (an int) limits the lower
        tiers' prefills; its `auto` waits for `engine_started`."""
        queue = config.queue
        return cls(
            config.max_concurrency,
            queue.max_depth,
            queue.max_wait_seconds,
            queue.max_queued_tokens,
            **{**_settings(config), **options},  # type: ignore[arg-type]
        )

    def engine_started(self, config: Config, *, whole_prompt_steps: bool) -> None:
        """Settle `queue.lower_prefills: auto` for the engine that runs: one per engine when
        each runs every prompt whole in one step (no chunked prefill), else no limit."""
        self.lower_prefills = lower_prefills(config, whole_prompt_steps=whole_prompt_steps)
        self._whole_prompt_steps = whole_prompt_steps

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

    def expected_drain_rate(self, priority: int | None = None) -> float:
        """The measured drain rate; before any release, the most it can be given how long the
        slots have been busy with nothing finished (predict.bound_drain_rate). For a request
        below the top priority while room is kept for it, only the lower tiers' releases
        count: a slot the top tier gives back is kept for the top tier."""
        now = self._clock()
        rate = None
        if priority is not None and priority < self.top_priority and self._reserving():
            rate = self._lower_drain.per_second(now)
        if rate is None:
            rate = self._drain.per_second(now)
        if rate is not None:
            return rate
        busy = 0.0 if self._busy_since is None else now - self._busy_since
        return bound_drain_rate(self.max_concurrency, busy)

    def predict(self, priority: int, prompt_tokens: int) -> Prediction:
        """Predicted wait and prefill of a request of `priority` joining now (predict.py)."""
        if self._may_start_now(priority):
            wait = 0.0
        else:
            weights = {p: self._weight(p) for p in {priority, *self._fair.counts()}}
            ahead = requests_ahead(priority, self._fair.counts(), weights)
            wait = wait_seconds(ahead, self.expected_drain_rate(priority))
        return Prediction(wait, self._prefill.seconds(prompt_tokens))

    def refuse_early(
        self,
        priority: int,
        prompt_tokens: int,
        deadline: float | None = None,
        ttft_slo: float | None = None,
    ) -> None:
        """Raise, before the request is charged anything, the 503 that `enqueue` would give a
        request whose predicted time to first token exceeds its objective."""
        now = self._clock()
        self._check_door(priority, deadline, now)
        self._check_objective(priority, prompt_tokens, deadline, ttft_slo, now)

    def retry_after(self, completions_needed: int) -> int:
        """Retry-After (whole seconds, 1..max_wait) for `completions_needed` releases: from the
        measured drain rate, or before any completion from a prior of PRIOR_REQUEST_SECONDS per
        request and slot (never the queue's whole max wait just because nothing finished yet)."""
        estimate = self._drain.seconds_for(completions_needed, self._clock())
        if estimate is None:
            estimate = completions_needed * PRIOR_REQUEST_SECONDS / max(1, self.max_concurrency)
        return retry_after_seconds(estimate, self.max_wait_seconds)

    # -- the request path --------------------------------------------------------------------

    def enqueue(
        self,
        priority: int = 0,
        tokens: int = 0,
        deadline: float | None = None,
        *,
        prompt_tokens: int = 0,
        ttft_slo: float | None = None,
    ) -> Ticket:
        """Take a ticket: admitted at once when a slot is free and nobody waits, else queued.

        Raises ServiceUnavailable (server_overloaded with Retry-After, or shutting_down) when
        it cannot even wait, or when its predicted time to first token exceeds `ttft_slo`
        (seconds) or its deadline; DeadlineExceeded when `deadline` (queue clock) has passed.
        """
        if tokens < 0:
            raise ValueError("tokens must be >= 0")
        now = self._clock()
        self._check_door(priority, deadline, now)
        if priority >= self.top_priority:
            self._top_seen_at = now
        ticket = Ticket(self, priority, tokens, deadline, now)
        ticket.prompt_tokens = prompt_tokens
        if self._may_start_now(priority):
            self._admit(ticket, now)  # the fast path: no future, no timer, no yield
            return ticket
        reason = self._refusal(tokens, priority)
        if reason is not None:
            self._observer.rejected(priority, reason, 0.0)
            raise server_overloaded(self.retry_after(self.depth + 1))
        prediction = self._check_objective(priority, prompt_tokens, deadline, ttft_slo, now)
        ticket.predicted_wait = prediction.wait_seconds
        give_up = None if ttft_slo is None else now + ttft_slo - prediction.prefill_seconds
        self._wait_in_line(ticket, now, give_up)
        return ticket

    def slot(self, priority: int = 0, tokens: int = 0, deadline: float | None = None) -> Slot:
        return Slot(self, priority, tokens, deadline)

    def _check_objective(
        self,
        priority: int,
        prompt_tokens: int,
        deadline: float | None,
        ttft_slo: float | None,
        now: float,
    ) -> Prediction:
        prediction = self.predict(priority, prompt_tokens)
        if prediction.wait_seconds <= 0:
            return prediction  # a slot is free: nothing could do better
        objective = ttft_slo
        if deadline is not None:
            objective = deadline - now if objective is None else min(objective, deadline - now)
        if objective is not None and prediction.ttft_seconds > DOOR_SHARE * objective:
            self._observer.rejected(priority, "slo", 0.0)
            excess = prediction.ttft_seconds - DOOR_SHARE * objective
            raise server_overloaded(
                retry_after_seconds(excess, self.max_wait_seconds),
                f"the predicted time to first token ({prediction.ttft_seconds:.1f}s) leaves too "
                f"little margin within this request's objective ({objective:.1f}s)",
            )
        return prediction

    def _reserving(self) -> bool:
        """Room is kept for the top priority while it is in use."""
        seen = self._top_seen_at
        return seen is not None and self._clock() - seen < RESERVE_ACTIVE_SECONDS

    def _may_start_now(self, priority: int) -> bool:
        """A request of this priority joining now takes a slot at once: one is free to it,
        nobody it would pass waits, and (below the top priority) its prefill may start."""
        return (
            self._in_flight < self._slot_limit(priority)
            and not self._fair.waiting_at_least(priority)
            and (priority >= self.top_priority or self._lower_prefill_may_start())
        )

    def _lower_prefill_may_start(self) -> bool:
        limit = self.lower_prefills
        if limit is None or not self._reserving():
            return True
        return self._lower_prefilling < limit and (
            not self._top_prefilling or self._lower_passes_top
        )

    def _slot_limit(self, priority: int) -> int:
        """Slots a request of this priority may take: all of them for the top priority."""
        if priority >= self.top_priority or not self._reserving():
            return self.max_concurrency
        return self.max_concurrency - self.reserved_slots

    def _first_token(self, ticket: Ticket) -> None:
        """The engine produced the ticket's first token: learn the prefill's speed, and let
        a lower tier's prefill start if this one held it back."""
        if ticket.admitted_at is None or ticket._state is not TicketState.ADMITTED:
            return
        now = self._clock()
        self._prefill.observe(ticket.prompt_tokens, now - ticket.admitted_at)
        if self._prefill_done(ticket) and self._fair:
            self._admit_waiters(now)

    def _first_token_unseen(self, ticket: Ticket) -> None:
        if ticket.prefilling is None:
            return
        delay = self._prefill.seconds(ticket.prompt_tokens)
        asyncio.get_running_loop().call_later(delay, self._prefill_predicted_over, ticket)

    def _prefill_predicted_over(self, ticket: Ticket) -> None:
        if self._prefill_done(ticket) and self._fair:
            self._admit_waiters(self._clock())

    def _prefill_done(self, ticket: Ticket) -> bool:
        """Count the ticket's prefill as over (first token, or released); True if it was
        still counted."""
        counted, ticket.prefilling = ticket.prefilling, None
        if counted == "lower":
            self._lower_prefilling -= 1
        elif counted == "top":
            self._top_prefilling -= 1
            # Top-tier prefills that overlap one another would hold the lower tiers back for
            # as long as they keep coming: each one that ends lets one lower prefill start
            # beside those still running.
            self._lower_passes_top = self._top_prefilling > 0
        return counted is not None

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

    def _refusal(self, tokens: int, priority: int) -> RejectReason | None:
        depth = len(self._fair)
        if depth >= self.max_depth:
            return "queue_full"
        kept = self.reserved_places if self._reserving() else 0
        if priority < self.top_priority and depth >= self.max_depth - kept:
            return "queue_full"  # the last places are kept for the top priority
        budget = self.max_queued_tokens
        # An empty queue takes any one request, or one bigger than the budget could never wait.
        if budget is not None and depth and self._queued_tokens + tokens > budget:
            return "queue_tokens"
        return None

    def _wait_in_line(self, ticket: Ticket, now: float, give_up: float | None = None) -> None:
        ticket._future = asyncio.get_running_loop().create_future()
        self._fair.push(ticket.priority, ticket, ticket)
        self._queued_tokens += ticket.tokens
        due = now + self.max_wait_seconds
        if ticket.deadline is not None:
            due = min(due, ticket.deadline)
        if give_up is not None:
            due = max(now, min(due, give_up))
        heapq.heappush(self._expiries, (due, next(self._sequence), ticket))
        self._arm_timer()

    def _admit(self, ticket: Ticket, now: float) -> None:
        ticket._state = TicketState.ADMITTED
        ticket.admitted_at = now
        if self._in_flight == 0:
            self._busy_since = now
        self._in_flight += 1
        if ticket.priority < self.top_priority:
            ticket.prefilling = "lower"
            self._lower_prefilling += 1
            self._lower_passes_top = False
        else:
            ticket.prefilling = "top"
            self._top_prefilling += 1
        waited = now - ticket.enqueued_at
        self._observer.admitted(ticket.priority, waited)
        if ticket.predicted_wait is not None:
            self._observer.predicted(ticket.priority, ticket.predicted_wait, waited)

    def _next_waiter(self) -> Ticket | None:
        """The next waiter allowed a free slot: anyone while unreserved slots are free and a
        lower tier's prefill may start, else only the top priority."""
        if self._in_flight >= self.max_concurrency or not self._fair:
            return None
        unreserved = self._in_flight < self.max_concurrency - self.reserved_slots
        if (unreserved or not self._reserving()) and self._lower_prefill_may_start():
            return self._fair.pop()
        if self._fair.waiting_at_least(self.top_priority):
            return self._fair.pop(min_priority=self.top_priority)
        return None

    def _admit_waiters(self, now: float) -> None:
        while (ticket := self._next_waiter()) is not None:
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
            self._prefill_done(ticket)
            if self._in_flight == 0:
                self._busy_since = None
            self._drain.record(now)
            if ticket.priority < self.top_priority:
                self._lower_drain.record(now)
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
        waited = now - ticket.enqueued_at
        if waited < self.max_wait_seconds:  # it gave up at its time-to-first-token objective
            error = server_overloaded(retry_after, f"no slot came within {waited:.1f}s, too late "
                                      "for this request's time-to-first-token objective")
            self._reject(ticket, error, "slo", now)
            return
        self._reject(ticket, queue_timeout(waited, retry_after), "queue_timeout", now)

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


class _Settings(TypedDict):
    top_priority: int
    reserved_slots: int
    reserved_places: int
    lower_prefills: int | None


def _settings(config: Config) -> _Settings:
    """The room kept for the top priority, from the tiers and queue.reserved_share."""
    priorities = {tier.priority for tier in config.limits.tiers.values()}
    share = config.queue.reserved_share if len(priorities) > 1 else 0.0
    slots, depth = config.max_concurrency, config.queue.max_depth
    return {
        "top_priority": max(priorities, default=0),
        "reserved_slots": min(slots - 1, int(share * slots)),
        "reserved_places": min(depth, int(share * depth)),
        "lower_prefills": lower_prefills(config, whole_prompt_steps=False),
    }


def lower_prefills(config: Config, *, whole_prompt_steps: bool) -> int | None:
    """`queue.lower_prefills` resolved: `auto` is one per engine (data-parallel rank) when
    each runs every prompt whole in one step (vLLM on CPU), else no limit (chunked prefill
    bounds a step's prompt tokens)."""
    setting = config.queue.lower_prefills
    if setting == "auto":
        return config.engine.data_parallel_size if whole_prompt_steps else None
    return setting


def _left_queue() -> InternalError:
    # Seen only by a task still waiting on a ticket that another task released.
    return InternalError("The request left the admission queue before it was admitted.")
