"""The admission queue with an injected clock: bounds, Retry-After, timeouts, priority, cancel."""

from __future__ import annotations

import asyncio

import pytest

from llmserve.admission import (
    AdmissionQueue,
    DeadlineExceeded,
    ManualClock,
    TicketState,
)
from llmserve.config import Config
from llmserve.errors import InternalError, ServiceUnavailable


class RecordingObserver:
    def __init__(self) -> None:
        self.admissions: list[tuple[int, float]] = []
        self.rejections: list[tuple[int, str, float]] = []
        self.releases: list[tuple[int, float]] = []
        self.predictions: list[tuple[int, float, float]] = []

    def admitted(self, priority: int, wait_seconds: float) -> None:
        self.admissions.append((priority, wait_seconds))

    def rejected(self, priority: int, reason: str, wait_seconds: float) -> None:
        self.rejections.append((priority, reason, wait_seconds))

    def released(self, priority: int, held_seconds: float) -> None:
        self.releases.append((priority, held_seconds))

    def predicted(self, priority: int, predicted_seconds: float, waited_seconds: float) -> None:
        self.predictions.append((priority, predicted_seconds, waited_seconds))

    def reasons(self) -> list[str]:
        return [reason for _, reason, _ in self.rejections]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def observer() -> RecordingObserver:
    return RecordingObserver()


def make_queue(clock, observer=None, **kwargs) -> AdmissionQueue:
    settings = {"max_concurrency": 2, "max_depth": 3, "max_wait_seconds": 30.0}
    settings.update(kwargs)
    return AdmissionQueue(**settings, clock=clock, observer=observer, auto_expire=False)


def complete_at_rate(queue: AdmissionQueue, clock: ManualClock, per_second: float, seconds: float):
    """Admit and release requests one after another at `per_second`, on an idle queue."""
    for _ in range(round(per_second * seconds)):
        clock.advance(1 / per_second)
        queue.enqueue().release()


async def test_a_free_slot_admits_without_a_future_a_timer_or_a_yield(clock, observer):
    queue = make_queue(clock, observer)
    ticket = queue.enqueue(priority=1, tokens=10)
    assert ticket.admitted and ticket._future is None and queue._timer is None
    waiting = ticket.wait()
    with pytest.raises(StopIteration) as done:  # finished on its first step: never suspended
        waiting.send(None)
    assert done.value.value is True
    assert (queue.in_flight, queue.depth, ticket.position, ticket.eta_seconds) == (1, 0, 0, 0.0)
    assert observer.admissions == [(1, 0.0)]


async def test_no_more_than_max_concurrency_hold_and_max_depth_wait(clock, observer):
    queue = make_queue(clock, observer)
    holders = [queue.enqueue(), queue.enqueue()]
    waiters = [queue.enqueue() for _ in range(3)]
    assert [t.state for t in waiters] == [TicketState.WAITING] * 3
    with pytest.raises(ServiceUnavailable) as refused:
        queue.enqueue()
    assert refused.value.code == "server_overloaded"
    assert refused.value.status == 503
    assert int(refused.value.headers["Retry-After"]) >= 1
    assert (queue.in_flight, queue.depth) == (2, 3)
    assert observer.reasons() == ["queue_full"]
    holders[0].release()
    assert waiters[0].admitted and queue.in_flight == 2 and queue.depth == 2


async def test_release_is_idempotent_and_hands_the_slot_to_one_waiter(clock, observer):
    queue = make_queue(clock, observer, max_concurrency=1)
    holder = queue.enqueue()
    first, second = queue.enqueue(), queue.enqueue()
    holder.release()
    holder.release()
    holder.release()
    assert first.admitted and second.state is TicketState.WAITING
    assert (queue.in_flight, queue.depth) == (1, 1)
    assert len(observer.releases) == 1
    first.release()
    second.release()
    second.release()
    assert (queue.in_flight, queue.depth) == (0, 0)


async def test_a_waiter_is_woken_when_a_slot_frees(clock, observer):
    queue = make_queue(clock, observer, max_concurrency=1)
    holder = queue.enqueue()
    waiter = queue.enqueue(priority=2)
    task = asyncio.create_task(waiter.wait())
    await asyncio.sleep(0)
    assert not task.done()
    clock.advance(1.5)
    holder.release()
    assert await task is True
    assert observer.admissions[-1] == (2, 1.5)
    assert observer.releases == [(0, 1.5)]


@pytest.mark.parametrize(("per_second", "expected"), [(2.0, 5), (1.0, 9), (10.0, 1)])
async def test_retry_after_is_the_backlog_divided_by_the_measured_drain_rate(
    clock, per_second, expected
):
    queue = make_queue(clock, max_concurrency=4, max_depth=8, max_wait_seconds=60.0)
    complete_at_rate(queue, clock, per_second, seconds=20)
    assert queue.drain_rate() == pytest.approx(per_second)
    for _ in range(4 + 8):
        queue.enqueue()
    with pytest.raises(ServiceUnavailable) as refused:
        queue.enqueue()
    # 8 waiting + this one: 9 completions before it could start
    assert refused.value.headers["Retry-After"] == str(expected)


async def test_before_any_completion_retry_after_comes_from_a_prior_not_the_max_wait(clock):
    queue = make_queue(clock, max_concurrency=8, max_depth=0, max_wait_seconds=30.0)
    for _ in range(8):
        queue.enqueue()
    with pytest.raises(ServiceUnavailable) as refused:
        queue.enqueue()
    # one slot must free up: 5 s per request over 8 slots, rounded up to 1 s, not 30
    assert refused.value.headers["Retry-After"] == "1"


async def test_retry_after_is_capped_by_max_wait_and_falls_back_to_it(clock):
    queue = make_queue(clock, max_concurrency=1, max_depth=1, max_wait_seconds=7.0)
    queue.enqueue()
    queue.enqueue()
    with pytest.raises(ServiceUnavailable) as unknown_rate:
        queue.enqueue()
    assert unknown_rate.value.headers["Retry-After"] == "7"
    assert queue.retry_after(1000) == 7


async def test_a_waiter_times_out_after_max_wait_with_retry_after(clock, observer):
    queue = make_queue(
        clock, observer, max_concurrency=1, max_wait_seconds=30.0, drain_window_seconds=60.0
    )
    complete_at_rate(queue, clock, 0.5, seconds=20)
    queue.enqueue()
    waiter = queue.enqueue(tokens=40)
    task = asyncio.create_task(waiter.wait())
    clock.advance(29.9)
    assert queue.expire() == 0 and waiter.state is TicketState.WAITING
    clock.advance(0.1)
    assert queue.expire() == 1
    with pytest.raises(ServiceUnavailable) as timed_out:
        await task
    assert timed_out.value.code == "queue_timeout"
    # 10 completions in the 50 s since the queue started: 0.2/s, and it was first in line
    assert timed_out.value.headers["Retry-After"] == "5"
    assert (queue.depth, queue.queued_tokens) == (0, 0)
    assert observer.rejections == [(0, "queue_timeout", pytest.approx(30.0))]


async def test_a_client_deadline_while_queued_is_a_504(clock, observer):
    queue = make_queue(clock, observer, max_concurrency=1)
    queue.enqueue()
    waiter = queue.enqueue(deadline=clock() + 8)  # predicted to start in about 5 s: it waits
    clock.advance(8)
    queue.expire()
    with pytest.raises(DeadlineExceeded) as late:
        await waiter.wait()
    assert (late.value.status, late.value.code) == (504, "deadline_exceeded")
    assert observer.reasons() == ["deadline"]


async def test_a_deadline_already_past_is_refused_at_the_door(clock, observer):
    queue = make_queue(clock, observer)
    with pytest.raises(DeadlineExceeded):
        queue.enqueue(deadline=clock() - 0.001)
    assert queue.in_flight == 0 and observer.reasons() == ["deadline"]


async def test_the_timer_expires_waiters_on_the_real_clock():
    # The one test on real time: it proves the timer path that production uses.
    queue = AdmissionQueue(1, 4, max_wait_seconds=0.02)
    queue.enqueue()
    waiter = queue.enqueue()
    with pytest.raises(ServiceUnavailable) as timed_out:
        await asyncio.wait_for(waiter.wait(), timeout=5)
    assert timed_out.value.code == "queue_timeout"
    assert queue.depth == 0 and queue._timer is None


async def test_cancelling_a_waiting_task_frees_its_place_at_once(clock, observer):
    queue = make_queue(clock, observer, max_concurrency=1)
    holder = queue.enqueue(tokens=1)
    leaving = queue.enqueue(tokens=50)
    staying = queue.enqueue(tokens=5)
    leaving_task = asyncio.create_task(leaving.wait())
    staying_task = asyncio.create_task(staying.wait())
    await asyncio.sleep(0)
    leaving_task.cancel()
    await asyncio.gather(leaving_task, return_exceptions=True)
    assert (queue.depth, queue.queued_tokens) == (1, 5)
    assert staying.position == 1
    assert observer.reasons() == ["cancelled"]
    holder.release()
    assert await staying_task is True


async def test_a_slot_freed_while_the_cancel_is_in_flight_skips_the_leaver(clock, observer):
    queue = make_queue(clock, observer, max_concurrency=1)
    holder = queue.enqueue()
    leaving, staying = queue.enqueue(), queue.enqueue()
    leaving_task = asyncio.create_task(leaving.wait())
    await asyncio.sleep(0)
    leaving_task.cancel()  # no yield: its handler has not run yet
    holder.release()
    assert staying.admitted and leaving.state is TicketState.REJECTED
    await asyncio.gather(leaving_task, return_exceptions=True)
    assert queue.in_flight == 1


async def test_a_slot_granted_to_a_task_cancelled_before_it_ran_is_passed_on(clock):
    queue = make_queue(clock, max_concurrency=1)
    holder = queue.enqueue()
    granted, next_one = queue.enqueue(), queue.enqueue()
    granted_task = asyncio.create_task(granted.wait())
    await asyncio.sleep(0)
    holder.release()  # the slot is granted, but the task has not resumed yet
    assert granted.admitted
    granted_task.cancel()
    await asyncio.gather(granted_task, return_exceptions=True)
    assert granted.state is TicketState.RELEASED
    assert next_one.admitted and queue.in_flight == 1


async def test_higher_priority_waiters_are_admitted_first(clock):
    queue = make_queue(clock, max_concurrency=1, max_depth=10)
    holder = queue.enqueue()
    low = queue.enqueue(priority=0)
    high = queue.enqueue(priority=3)
    assert (high.position, low.position) == (1, 2)
    holder.release()
    assert high.admitted and not low.admitted


async def test_the_lowest_tier_still_progresses_under_constant_high_load(clock, observer):
    queue = make_queue(clock, observer, max_concurrency=2, max_depth=40)
    tickets = [queue.enqueue(priority=p) for p in [3] * 22 + [0] * 10]
    observer.admissions.clear()
    for _ in range(90):
        holder = next(t for t in tickets if t.admitted)
        tickets.remove(holder)
        holder.release()
        # whichever tier was just admitted gets a new waiter: both stay backlogged
        tickets.append(queue.enqueue(priority=observer.admissions[-1][0]))
    order = "".join("H" if p == 3 else "L" for p, _ in observer.admissions)
    assert order.count("L") in (9, 10, 11)  # weights 8:1
    assert max(len(run) for run in order.split("L")) <= 8


async def test_the_token_budget_caps_what_waits(clock, observer):
    queue = make_queue(clock, observer, max_concurrency=1, max_depth=10, max_queued_tokens=100)
    holder = queue.enqueue(tokens=5000)  # holders do not count: only waiters
    first = queue.enqueue(tokens=60)
    with pytest.raises(ServiceUnavailable) as refused:
        queue.enqueue(tokens=50)
    assert refused.value.code == "server_overloaded" and "Retry-After" in refused.value.headers
    assert observer.reasons() == ["queue_tokens"]
    queue.enqueue(tokens=40)
    assert queue.queued_tokens == 100
    holder.release()
    assert first.admitted and queue.queued_tokens == 40


async def test_one_request_bigger_than_the_budget_may_wait_alone(clock):
    queue = make_queue(clock, max_concurrency=1, max_depth=10, max_queued_tokens=100)
    queue.enqueue()
    big = queue.enqueue(tokens=500)
    assert big.state is TicketState.WAITING and queue.queued_tokens == 500
    with pytest.raises(ServiceUnavailable):
        queue.enqueue(tokens=1)


async def test_position_and_eta_follow_the_drain_rate(clock):
    queue = make_queue(clock, max_concurrency=1, max_depth=10)
    complete_at_rate(queue, clock, 2.0, seconds=10)
    queue.enqueue()
    waiters = [queue.enqueue() for _ in range(3)]
    assert [t.position for t in waiters] == [1, 2, 3]
    assert [t.eta_seconds for t in waiters] == [pytest.approx(x) for x in (0.5, 1.0, 1.5)]


async def test_eta_is_unknown_before_anything_completed(clock):
    queue = make_queue(clock, max_concurrency=1)
    queue.enqueue()
    assert queue.enqueue().eta_seconds is None


async def test_wait_with_a_timeout_returns_false_and_keeps_the_place(clock):
    queue = make_queue(clock, max_concurrency=1)
    holder = queue.enqueue()
    waiter = queue.enqueue()
    assert await waiter.wait(timeout=0) is False
    assert waiter.state is TicketState.WAITING and waiter.position == 1
    holder.release()
    assert await waiter.wait(timeout=0) is True


async def test_a_ticket_released_by_another_task_ends_its_wait(clock):
    queue = make_queue(clock, max_concurrency=1)
    queue.enqueue()
    waiter = queue.enqueue()
    task = asyncio.create_task(waiter.wait())
    await asyncio.sleep(0)
    waiter.release()
    with pytest.raises(InternalError):
        await task
    assert queue.depth == 0


async def test_close_rejects_waiters_and_newcomers_but_keeps_holders(clock, observer):
    queue = make_queue(clock, observer, max_concurrency=1)
    holder = queue.enqueue()
    waiter = queue.enqueue()
    queue.close()
    with pytest.raises(ServiceUnavailable) as closed:
        await waiter.wait()
    assert closed.value.code == "shutting_down"
    with pytest.raises(ServiceUnavailable):
        queue.enqueue()
    assert holder.admitted and queue.in_flight == 1
    holder.release()
    assert queue.in_flight == 0
    assert observer.reasons() == ["shutting_down", "shutting_down"]


async def test_slot_releases_on_exit_and_on_error(clock):
    queue = make_queue(clock, max_concurrency=1)
    async with queue.slot(priority=1, tokens=3) as ticket:
        assert ticket.admitted and queue.in_flight == 1
    assert queue.in_flight == 0
    with pytest.raises(RuntimeError):
        async with queue.slot():
            raise RuntimeError("engine failed")
    assert queue.in_flight == 0


async def test_slot_cancelled_while_queued_leaves_nothing_behind(clock):
    queue = make_queue(clock, max_concurrency=1)
    holder = queue.enqueue()

    async def use_slot() -> None:
        async with queue.slot():
            pass

    task = asyncio.create_task(use_slot())
    await asyncio.sleep(0)
    assert queue.depth == 1
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert queue.depth == 0
    holder.release()
    assert queue.in_flight == 0


def test_from_config_defaults_concurrency_to_the_engines_batch():
    config = Config.model_validate(
        {"engine": {"max_num_seqs": 12}, "queue": {"max_depth": 5, "max_queued_tokens": 900}}
    )
    queue = AdmissionQueue.from_config(config, auto_expire=False)
    assert (queue.max_concurrency, queue.max_depth, queue.max_queued_tokens) == (12, 5, 900)
    assert queue.max_wait_seconds == config.queue.max_wait_seconds


def test_invalid_bounds_are_refused():
    with pytest.raises(ValueError):
        AdmissionQueue(0, 1, 1.0)
    with pytest.raises(ValueError):
        AdmissionQueue(1, -1, 1.0)
