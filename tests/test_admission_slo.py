"""Admission keeps the time-to-first-token promise: it predicts a newcomer's wait and prefill,
refuses at once what cannot start in time, and keeps room for the top tier."""

from __future__ import annotations

import pytest

from llmserve.admission import AdmissionQueue
from llmserve.admission.predict import (
    PRIOR_PREFILL_SECONDS,
    PRIOR_PREFILL_SECONDS_PER_TOKEN,
    PrefillModel,
    requests_ahead,
)
from llmserve.clock import ManualClock
from llmserve.errors import ServiceUnavailable
from tests.test_admission_queue import RecordingObserver


def make_queue(clock: ManualClock, observer: RecordingObserver | None = None,
               **kwargs: object) -> AdmissionQueue:  # fmt: skip
    settings: dict[str, object] = {"max_concurrency": 2, "max_depth": 8, "max_wait_seconds": 60.0}
    settings.update(kwargs)
    return AdmissionQueue(**settings, clock=clock, observer=observer,  # type: ignore[arg-type]
                          auto_expire=False)  # fmt: skip


def drain_at(queue: AdmissionQueue, clock: ManualClock, per_second: float, count: int) -> None:
    """Requests finishing at `per_second` on an idle queue: the drain rate the queue learns."""
    for _ in range(count):
        ticket = queue.enqueue()
        clock.advance(1 / per_second)
        ticket.release()


def test_prefill_is_fitted_from_recorded_timings() -> None:
    model = PrefillModel()
    assert model.seconds(1000) == pytest.approx(
        PRIOR_PREFILL_SECONDS + 1000 * PRIOR_PREFILL_SECONDS_PER_TOKEN)  # fmt: skip
    for tokens in (50, 400, 120, 900, 300, 700, 60, 1000):  # recorded: 0.2 s + 2 ms/token
        model.observe(tokens, 0.2 + 0.002 * tokens)
    assert model.seconds(500) == pytest.approx(1.2, rel=1e-6)
    assert model.seconds(2000) == pytest.approx(4.2, rel=1e-6)


def test_prefill_of_prompts_all_of_one_length_is_their_mean() -> None:
    model = PrefillModel()
    for seconds in (0.5, 0.7, 0.6, 0.6):
        model.observe(128, seconds)
    assert 0.55 < model.seconds(128) < 0.65


def test_lower_tiers_count_ahead_only_by_their_fair_share() -> None:
    weights = {0: 1.0, 1: 2.0, 3: 8.0}
    # a priority-1 newcomer: 4 of its own class and 2 of a higher one go first; of the 10
    # priority-0 waiters, fairness serves 1 for every 2 of its class meanwhile
    assert requests_ahead(1, {0: 10, 1: 4, 3: 2}, weights) == pytest.approx(6 + 3)
    assert requests_ahead(3, {0: 10, 1: 4, 3: 2}, weights) == pytest.approx(2 + 0.25 + 0.5)


async def test_a_request_that_cannot_start_in_time_is_refused_at_the_door() -> None:
    clock, observer = ManualClock(), RecordingObserver()
    queue = make_queue(clock, observer)
    drain_at(queue, clock, per_second=1.0, count=10)  # one slot frees up per second
    holders = [queue.enqueue(), queue.enqueue()]
    waiters = [queue.enqueue(ttft_slo=10.0) for _ in range(4)]
    prediction = queue.predict(0, prompt_tokens=0)
    assert prediction.wait_seconds == pytest.approx(5.0)  # 4 ahead, plus one slot, at 1/s
    with pytest.raises(ServiceUnavailable) as refused:
        queue.enqueue(ttft_slo=3.0)
    assert refused.value.code == "server_overloaded"
    assert "predicted time to first token" in refused.value.message
    # 5.05 s predicted against 80% of 3 s: retry in the 2.65 s it overshoots, rounded up
    assert refused.value.headers["Retry-After"] == "3"
    assert queue.depth == 4 and observer.reasons() == ["slo"]
    queue.enqueue(ttft_slo=7.0)  # within 80% of its objective: it waits
    assert queue.depth == 5
    for ticket in holders + waiters:
        ticket.release()


async def test_a_deadline_shorter_than_the_objective_is_the_objective() -> None:
    clock = ManualClock()
    queue = make_queue(clock)
    drain_at(queue, clock, per_second=1.0, count=10)
    holders = [queue.enqueue(), queue.enqueue()]
    with pytest.raises(ServiceUnavailable):
        queue.refuse_early(0, 0, deadline=clock() + 0.5, ttft_slo=10.0)
    queue.refuse_early(0, 0, deadline=clock() + 5.0, ttft_slo=10.0)  # 1.05 s fits
    for ticket in holders:
        ticket.release()


async def test_a_waiter_whose_first_token_can_no_longer_come_in_time_leaves_with_503() -> None:
    clock, observer = ManualClock(), RecordingObserver()
    queue = make_queue(clock, observer, max_concurrency=1)
    drain_at(queue, clock, per_second=1.0, count=5)
    holder = queue.enqueue()
    waiter = queue.enqueue(ttft_slo=4.0)  # predicted 1.05 s: admitted to the queue
    clock.advance(3.96)  # the holder is much slower: 4 s minus its 0.05 s prefill is past
    queue.expire()
    with pytest.raises(ServiceUnavailable) as late:
        await waiter.wait()
    assert late.value.code == "server_overloaded"
    assert "too late" in late.value.message
    assert observer.reasons() == ["slo"]
    holder.release()


async def test_the_door_keeps_a_margin_below_the_objective_for_prediction_errors() -> None:
    clock = ManualClock()
    queue = make_queue(clock)
    drain_at(queue, clock, per_second=1.0, count=10)
    holders = [queue.enqueue(), queue.enqueue()]
    with pytest.raises(ServiceUnavailable):
        queue.enqueue(ttft_slo=1.25)  # 1.05 s predicted: within the objective, not the margin
    waiter = queue.enqueue(ttft_slo=1.35)  # 1.05 s is under 80% of 1.35 s
    assert queue.depth == 1
    for ticket in [*holders, waiter]:
        ticket.release()


async def test_before_any_completion_nobody_is_refused_on_a_guess() -> None:
    clock = ManualClock()
    queue = make_queue(clock, max_concurrency=1)
    holder = queue.enqueue()
    waiter = queue.enqueue(ttft_slo=1.0)  # no evidence of the engine's speed yet: it waits
    assert not waiter.admitted and queue.depth == 1
    clock.advance(1.0)  # ... and leaves at its objective if no slot came
    queue.expire()
    with pytest.raises(ServiceUnavailable):
        await waiter.wait()
    holder.release()


async def test_before_any_completion_slots_busy_for_long_are_evidence_enough() -> None:
    clock = ManualClock()
    queue = make_queue(clock)  # 2 slots
    holders = [queue.enqueue(), queue.enqueue()]
    clock.advance(4.0)  # nothing finished in 4 s: a slot frees up at most every 2 s
    assert queue.drain_rate() is None
    assert queue.expected_drain_rate() == pytest.approx(0.5)
    first = queue.enqueue(ttft_slo=10.0)  # at least 2 s: it may make it, so it waits
    assert not first.admitted and queue.depth == 1
    with pytest.raises(ServiceUnavailable) as refused:
        queue.enqueue(ttft_slo=4.0)  # at least 4 s with one ahead: it cannot make it
    assert "predicted time to first token (4.0s)" in refused.value.message
    clock.advance(16.0)  # 20 s without a release: at least 10 s a request
    assert queue.expected_drain_rate() == pytest.approx(0.1)
    holders[0].release()  # from the first release on, the measured rate: 1 in the last 10 s
    assert queue.drain_rate() == pytest.approx(0.1)
    for ticket in [holders[1], first]:
        ticket.release()


async def test_an_idle_queue_admits_at_once_whatever_the_objective() -> None:
    queue = make_queue(ManualClock())
    ticket = queue.enqueue(prompt_tokens=100_000, ttft_slo=0.001)  # prefill alone is too long
    assert ticket.admitted
    ticket.release()


async def test_the_prediction_error_is_reported_when_a_waiter_gets_its_slot() -> None:
    clock, observer = ManualClock(), RecordingObserver()
    queue = make_queue(clock, observer, max_concurrency=1)
    drain_at(queue, clock, per_second=2.0, count=6)
    holder = queue.enqueue()
    waiter = queue.enqueue(ttft_slo=30.0)
    clock.advance(1.5)
    holder.release()
    assert waiter.admitted
    [(_, predicted, waited)] = observer.predictions
    assert predicted == pytest.approx(0.5) and waited == pytest.approx(1.5)
    waiter.release()


async def test_the_first_token_teaches_the_queue_the_prefill_speed() -> None:
    clock = ManualClock()
    queue = make_queue(clock)
    for tokens in (100, 300, 500, 700):
        ticket = queue.enqueue(prompt_tokens=tokens)
        clock.advance(0.1 + 0.001 * tokens)
        ticket.first_token()
        ticket.release()
    assert queue.predict(0, 1000).prefill_seconds == pytest.approx(1.1, rel=1e-6)


async def test_lower_tiers_cannot_take_the_slots_kept_for_the_top_tier() -> None:
    clock = ManualClock()
    queue = make_queue(clock, max_concurrency=4, max_depth=8, top_priority=10,
                       reserved_slots=1, reserved_places=2)  # fmt: skip
    queue.enqueue(priority=10).release()  # the top tier is in use
    low = [queue.enqueue(priority=0) for _ in range(3)]
    assert all(t.admitted for t in low)
    blocked = queue.enqueue(priority=0)
    assert not blocked.admitted  # the fourth slot is free, but kept
    top = queue.enqueue(priority=10)
    assert top.admitted  # the top tier takes it at once, past the waiting low request
    more_low = [queue.enqueue(priority=0) for _ in range(5)]  # 6 of the 8 places
    with pytest.raises(ServiceUnavailable):
        queue.enqueue(priority=0)  # the last 2 places are kept too
    queue.enqueue(priority=10)  # but not for the top tier
    top.release()  # a slot frees up while the top tier waits: it goes to the top tier
    assert queue.in_flight == 4 and not blocked.admitted
    low[0].release()  # 3 of 4 busy: the free one is the kept one, whoever holds the others
    assert not blocked.admitted
    low[1].release()  # now an unreserved slot is free: the low waiter gets it
    assert blocked.admitted
    for ticket in [*low, blocked, *more_low]:
        ticket.release()


async def test_room_is_kept_for_the_top_tier_only_while_it_is_in_use() -> None:
    clock = ManualClock()
    queue = make_queue(clock, max_concurrency=4, top_priority=10, reserved_slots=1)
    alone = [queue.enqueue(priority=0) for _ in range(4)]
    assert all(t.admitted for t in alone)  # no top-tier traffic: every slot is usable
    for ticket in alone:
        ticket.release()
    queue.enqueue(priority=10).release()
    kept = [queue.enqueue(priority=0) for _ in range(4)]
    assert [t.admitted for t in kept] == [True, True, True, False]
    clock.advance(61)  # a minute without the top tier: the kept slot is given back
    kept[0].release()
    kept[1].release()
    assert kept[3].admitted and queue.enqueue(priority=0).admitted
    for ticket in kept:
        ticket.release()


def test_the_config_keeps_a_share_for_the_top_tier_only_with_several_priorities() -> None:
    from llmserve.config import Config

    two = Config.model_validate({
        "engine": {"kind": "fake", "max_num_seqs": 8},
        "limits": {"default_tier": "free", "tiers": {"free": {}, "pro": {"priority": 10}}},
    })  # fmt: skip
    queue = AdmissionQueue.from_config(two)
    assert (queue.top_priority, queue.reserved_slots, queue.reserved_places) == (10, 2, 16)
    one = Config.model_validate({"engine": {"kind": "fake"}})
    assert AdmissionQueue.from_config(one).reserved_slots == 0


async def test_a_reload_with_more_slots_admits_waiters_at_once() -> None:
    from llmserve.config import Config

    clock = ManualClock()
    queue = make_queue(clock, max_concurrency=1)
    holder, waiter = queue.enqueue(), queue.enqueue()
    assert not waiter.admitted
    queue.reconfigure(Config.model_validate({
        "engine": {"kind": "fake"}, "queue": {"max_concurrency": 2, "max_depth": 5}}))  # fmt: skip
    assert waiter.admitted and (queue.max_concurrency, queue.max_depth) == (2, 5)
    holder.release()
    waiter.release()


async def test_a_lower_tier_waiter_is_predicted_from_the_lower_tiers_releases_only() -> None:
    clock = ManualClock()
    queue = make_queue(clock, max_concurrency=4, max_depth=8, top_priority=10, reserved_slots=1)
    for _ in range(10):  # over 10 s: the top tier frees 3 slots a second, the lower tiers 1
        for priority in (10, 10, 10, 0):
            ticket = queue.enqueue(priority=priority)
            clock.advance(0.25)
            ticket.release()
    busy = [*(queue.enqueue(priority=0) for _ in range(3)), queue.enqueue(priority=10)]
    assert all(t.admitted for t in busy)
    # a slot the top tier gives back stays kept for it: a lower newcomer waits for a lower
    # tier's release (1/s), not for any release (4/s)
    assert queue.predict(0, 0).wait_seconds == pytest.approx(1.0, rel=0.05)
    assert queue.predict(10, 0).wait_seconds == pytest.approx(0.25, rel=0.05)
    for ticket in busy:
        ticket.release()
