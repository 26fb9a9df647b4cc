"""A request's place in the admission queue (`Ticket`) and the `async with` form (`Slot`)."""

from __future__ import annotations

import asyncio
import enum
from types import TracebackType
from typing import TYPE_CHECKING, Literal

from llmserve.errors import APIError

if TYPE_CHECKING:
    from llmserve.admission.queue import AdmissionQueue


class TicketState(enum.Enum):
    WAITING = "waiting"
    ADMITTED = "admitted"
    RELEASED = "released"  # held a slot and gave it back
    REJECTED = "rejected"  # left the queue without a slot (timeout, deadline, cancel, close)


class Ticket:
    """One request's place: waiting, then holding a slot, then released. Awaited by one task."""

    __slots__ = (
        "_error",
        "_future",
        "_queue",
        "_state",
        "admitted_at",
        "deadline",
        "enqueued_at",
        "predicted_wait",
        "prefilling",
        "priority",
        "prompt_tokens",
        "tokens",
    )

    def __init__(
        self, queue: AdmissionQueue, priority: int, tokens: int, deadline: float | None, now: float
    ) -> None:
        self._queue = queue
        self._state = TicketState.WAITING
        self._future: asyncio.Future[None] | None = None
        self._error: APIError | None = None
        self.priority = priority
        self.tokens = tokens
        self.deadline = deadline  # on the queue's clock; the caller also enforces it while running
        self.enqueued_at = now
        self.admitted_at: float | None = None
        self.prompt_tokens = 0  # for the prefill model, once its first token comes
        self.predicted_wait: float | None = None  # what the queue predicted at the door
        # admitted, first token not yet out: counted as the top priority's or a lower one's
        self.prefilling: Literal["lower", "top"] | None = None

    def __repr__(self) -> str:
        return f"<Ticket {self._state.value} priority={self.priority} tokens={self.tokens}>"

    @property
    def state(self) -> TicketState:
        return self._state

    @property
    def admitted(self) -> bool:
        return self._state is TicketState.ADMITTED

    @property
    def position(self) -> int:
        """1-based place in the service order while waiting (an estimate); 0 otherwise."""
        if self._state is not TicketState.WAITING:
            return 0
        return self._queue._position(self)

    @property
    def eta_seconds(self) -> float | None:
        """Expected wait from the drain rate: 0 when not waiting, None while the rate is unknown."""
        position = self.position
        if not position:
            return 0.0
        return self._queue._seconds_for(position)

    async def wait(self, timeout: float | None = None) -> bool:
        """Return True once admitted; False if `timeout` (seconds) passed while still waiting.

        Raises the rejection (queue_timeout, deadline_exceeded, shutting_down) if the ticket
        left the queue. Cancelling the awaiting task takes the ticket out of the queue at once.
        When already admitted it returns without yielding to the event loop.
        """
        if self._state is TicketState.WAITING:
            future = self._future
            assert future is not None
            try:
                if timeout is None:
                    await future  # cancelling the task cancels it: _admit_waiters skips it
                elif not (await asyncio.wait((future,), timeout=timeout))[0]:
                    return False
            except asyncio.CancelledError:
                self._queue._abandon(self)
                raise
        if self._error is not None:
            raise self._error
        return self._state is TicketState.ADMITTED

    def first_token(self) -> None:
        """The engine produced this request's first token: teaches the queue's prefill model
        (seconds from admission to first token, against the prompt's length), and ends its
        prefill for `lower_prefills`."""
        self._queue._first_token(self)

    def first_token_unseen(self) -> None:
        """The engine reports this request's output only at its end: its prefill counts as
        over for `lower_prefills` after the predicted prefill time, and teaches nothing."""
        self._queue._first_token_unseen(self)

    def release(self) -> None:
        """Give the slot back (or leave the queue). Idempotent; safe in any state."""
        self._queue._release(self)


class Slot:
    """`async with queue.slot(...) as ticket:` holds a slot for the body of the block."""

    __slots__ = ("_args", "_queue", "_ticket")

    def __init__(
        self, queue: AdmissionQueue, priority: int, tokens: int, deadline: float | None
    ) -> None:
        self._queue = queue
        self._args = (priority, tokens, deadline)
        self._ticket: Ticket | None = None

    async def __aenter__(self) -> Ticket:
        ticket = self._ticket = self._queue.enqueue(*self._args)
        try:
            await ticket.wait()
        except BaseException:
            ticket.release()
            raise
        return ticket

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._ticket is not None:
            self._ticket.release()
