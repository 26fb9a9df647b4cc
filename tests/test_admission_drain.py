"""The drain-rate estimate and the Retry-After it gives (pure arithmetic)."""

from __future__ import annotations

import pytest

from llmserve.admission.drain import DrainRate, retry_after_seconds


def test_rate_is_unknown_before_any_completion():
    drain = DrainRate(start=0.0)
    assert drain.per_second(5.0) is None
    assert drain.seconds_for(3, 5.0) is None


def test_steady_completions_give_their_rate():
    drain = DrainRate(start=0.0, window_seconds=10.0)
    for i in range(1, 201):  # 10 per second for 20 s
        drain.record(i / 10)
    assert drain.per_second(20.0) == pytest.approx(10.0)
    assert drain.seconds_for(25, 20.0) == pytest.approx(2.5)


def test_a_young_estimator_divides_by_its_age_not_the_window():
    drain = DrainRate(start=0.0, window_seconds=10.0)
    for t in (1.0, 2.0, 3.0, 4.0):
        drain.record(t)
    assert drain.per_second(4.0) == pytest.approx(1.0)


def test_completions_older_than_the_window_are_forgotten():
    drain = DrainRate(start=0.0, window_seconds=10.0)
    for i in range(1, 11):
        drain.record(float(i))
    assert drain.per_second(15.0) == pytest.approx(0.5)  # 11..15 hold 0, 6..10 hold 5
    # an idle window keeps the last rate measured: an idle engine has not become slower
    assert drain.per_second(60.0) == pytest.approx(0.5)


def test_after_an_idle_spell_the_last_measured_rate_stands():
    drain = DrainRate(start=0.0, window_seconds=10.0)
    for i in range(1, 21):
        drain.record(i * 0.5)  # 2 completions a second for 10 s
    assert drain.seconds_for(6, 300.0) == pytest.approx(3.0)  # not unknown, five minutes on


def test_window_must_be_positive():
    with pytest.raises(ValueError):
        DrainRate(start=0.0, window_seconds=0)


@pytest.mark.parametrize(
    ("estimate", "ceiling", "expected"),
    [
        (None, 30.0, 30),
        (0.2, 30.0, 1),
        (3.2, 30.0, 4),
        (3.0, 30.0, 3),
        (95.0, 30.0, 30),
        (None, 0.5, 1),
    ],
)
def test_retry_after_is_whole_seconds_between_one_and_the_ceiling(estimate, ceiling, expected):
    assert retry_after_seconds(estimate, ceiling) == expected
