"""The fairness rule between priority classes (pure, no event loop)."""

from __future__ import annotations

import random

import pytest

from llmserve.admission.fairness import FairQueue, default_weight


def _fill(queue: FairQueue[str], priority: int, count: int, tag: str) -> None:
    for i in range(count):
        name = f"{tag}{i}"
        queue.push(priority, name, name)


def test_one_class_is_served_oldest_first():
    queue: FairQueue[str] = FairQueue()
    _fill(queue, 0, 5, "a")
    assert [queue.pop() for _ in range(5)] == ["a0", "a1", "a2", "a3", "a4"]
    with pytest.raises(IndexError):
        queue.pop()


def test_backlogged_classes_are_served_in_proportion_to_their_weights():
    queue: FairQueue[str] = FairQueue()
    _fill(queue, 1, 100, "H")
    _fill(queue, 0, 100, "L")
    served = [queue.pop()[0] for _ in range(30)]
    # weights 2:1, equal passes go to the higher priority first
    assert "".join(served) == "HLH" * 10


def test_higher_priority_goes_first_when_both_arrive_together():
    queue: FairQueue[str] = FairQueue()
    queue.push(0, "low", "low")
    queue.push(3, "high", "high")
    assert queue.pop() == "high"


def test_lowest_tier_progresses_under_constant_higher_load():
    queue: FairQueue[str] = FairQueue()
    _fill(queue, 0, 50, "L")
    arrivals = 0
    gaps, since_low, lows = [], 0, 0
    for _ in range(6000):
        for priority in (10, 5):  # the higher tiers never run dry
            queue.push(priority, f"h{arrivals}", "H")
            arrivals += 1
        if queue.pop() == "H":
            since_low += 1
        else:
            lows += 1
            gaps.append(since_low)
            since_low = 0
    # weights 1024 and 32 against 1: one low admission per 1024 + 32 higher ones at most
    assert lows >= 5
    assert max(gaps) <= 1024 + 32


def test_an_idle_class_banks_no_credit():
    queue: FairQueue[str] = FairQueue()
    _fill(queue, 1, 500, "H")
    for _ in range(100):
        queue.pop()
    _fill(queue, 0, 50, "L")
    served = "".join(queue.pop()[0] for _ in range(30))
    assert served.count("L") == 10  # its weight share from now on, not a burst of 100


def test_a_class_that_empties_and_rejoins_keeps_its_place():
    queue: FairQueue[str] = FairQueue()
    _fill(queue, 1, 1000, "H")
    queue.push(0, "l", "L")
    lows = 0
    for i in range(300):
        if queue.pop() == "L":
            lows += 1
            queue.push(0, f"l{i}", "L")  # one low request at a time, always back at once
    assert lows in (99, 100, 101)


def test_remove_takes_an_item_out_of_the_order():
    queue: FairQueue[str] = FairQueue()
    _fill(queue, 0, 3, "a")
    assert queue.remove(0, "a1") == "a1"
    assert queue.remove(0, "a1") is None
    assert queue.remove(7, "a0") is None
    assert len(queue) == 2
    assert [queue.pop(), queue.pop()] == ["a0", "a2"]


@pytest.mark.parametrize("seed", range(20))
def test_position_is_the_exact_service_order_without_new_arrivals(seed):
    rng = random.Random(seed)
    queue: FairQueue[int] = FairQueue()
    keys: dict[int, int] = {}
    for key in range(rng.randint(5, 60)):
        priority = rng.choice([-1, 0, 1, 2, 4])
        queue.push(priority, key, key)
        keys[key] = priority
        if rng.random() < 0.3:
            keys.pop(queue.pop())
        if keys and rng.random() < 0.1:
            gone = rng.choice(list(keys))
            queue.remove(keys.pop(gone), gone)
    predicted = {key: queue.position(priority, key) for key, priority in keys.items()}
    actual = {queue.pop(): place for place in range(1, len(keys) + 1)}
    assert predicted == actual
    assert queue.position(0, "absent") == 0


def test_default_weight_doubles_per_step_and_is_clamped():
    assert [default_weight(p) for p in (-3, 0, 1, 2, 10, 99)] == [1, 1, 2, 4, 1024, 1024]


def test_an_empty_queue_forgets_all_passes():
    queue: FairQueue[str] = FairQueue()
    _fill(queue, 1, 10, "H")
    for _ in range(10):
        queue.pop()
    _fill(queue, 0, 3, "L")
    queue.push(1, "h", "H")
    assert queue.pop() == "H"  # a fresh start: equal passes, higher priority first
