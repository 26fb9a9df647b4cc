"""Pure arithmetic of the limiter: windows, costs, Retry-After and header values."""

from __future__ import annotations

import calendar

import pytest

from llmserve.config import LimitsConfig, TierConfig
from llmserve.errors import ConfigError, PermissionDenied
from llmserve.limits.headers import format_duration, rate_limit_headers
from llmserve.limits.tiers import plan_tier, validate_overrides
from llmserve.limits.windows import (
    WindowStatus,
    charge_for,
    day_window,
    make_rule,
    month_window,
    refill,
    retry_after,
    status,
)


def utc(*fields: int) -> float:
    return float(calendar.timegm((*fields, 0, 0, 0)[:6]))


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.0004, "1ms"),
        (0.02, "20ms"),
        (0.999, "999ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (6, "6s"),
        (59.9991, "1m0s"),
        (360, "6m0s"),
        (61.25, "1m1.25s"),
        (3600, "1h0m0s"),
        (86_399, "23h59m59s"),
    ],
)
def test_durations_are_written_like_openai(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_day_window_ends_at_the_next_utc_midnight() -> None:
    first, end = day_window(utc(2025, 3, 14, 23, 59, 59))
    assert end == utc(2025, 3, 15)
    second, _ = day_window(utc(2025, 3, 15))
    assert second == first + 1


@pytest.mark.parametrize(
    ("moment", "end"),
    [
        ((2025, 1, 31, 23, 59, 59), (2025, 2, 1)),
        ((2024, 2, 29, 12, 0, 0), (2024, 3, 1)),
        ((2024, 12, 31, 23, 0, 0), (2025, 1, 1)),
    ],
)
def test_month_window_ends_on_the_first_of_the_next_month(
    moment: tuple[int, ...], end: tuple[int, ...]
) -> None:
    window_id, window_end = month_window(utc(*moment))
    assert window_end == utc(*end)
    assert month_window(window_end)[0] == window_id + 1


def test_bucket_refills_linearly_and_never_below_zero() -> None:
    rate = 600 / 60
    assert refill(600, 100.0, 130.0, rate) == 300
    assert refill(600, 100.0, 200.0, rate) == 0
    assert refill(600, 100.0, 90.0, rate) == 600  # a clock behind the last update drains nothing


def test_retry_after_is_when_the_bucket_has_room() -> None:
    charge = charge_for(make_rule("tokens_per_minute", 600), 100, now=0.0)
    assert retry_after(charge, 500, 0.0) == 0.0
    assert retry_after(charge, 550, 0.0) == pytest.approx(5.0)
    too_big = charge_for(make_rule("tokens_per_minute", 600), 601, now=0.0)
    assert retry_after(too_big, 0, 0.0) is None


def test_retry_after_of_a_full_day_is_the_rest_of_the_day() -> None:
    now = utc(2025, 3, 14, 18, 0, 0)
    charge = charge_for(make_rule("tokens_per_day", 1000), 10, now)
    assert retry_after(charge, 995, now) == 6 * 3600


def test_status_rounds_so_a_client_is_never_told_too_much() -> None:
    charge = charge_for(make_rule("requests_per_minute", 10), 1, now=0.0)
    window = status(charge, 2.5, 0.0)
    assert (window.used, window.remaining, window.reset_seconds) == (3, 7, 15.0)


def test_headers_take_tokens_from_the_minute_window_first() -> None:
    windows = [
        WindowStatus("requests_per_minute", 60, 1, 59, 1.0),
        WindowStatus("tokens_per_minute", 1000, 100, 900, 6.0),
        WindowStatus("tokens_per_day", 5000, 100, 4900, 3600.0),
    ]
    assert rate_limit_headers(windows)["x-ratelimit-remaining-tokens"] == "900"


def test_headers_without_a_minute_window_show_the_scarcest_calendar_window() -> None:
    windows = [
        WindowStatus("tokens_per_day", 5000, 4000, 1000, 3600.0),
        WindowStatus("tokens_per_month", 90_000, 89_500, 500, 7200.0),
    ]
    headers = rate_limit_headers(windows)
    assert headers["x-ratelimit-remaining-tokens"] == "500"
    assert headers["x-ratelimit-reset-tokens"] == "2h0m0s"
    assert "x-ratelimit-limit-requests" not in headers


def test_plan_lists_only_configured_windows_and_applies_overrides() -> None:
    config = LimitsConfig(
        tiers={"default": TierConfig(), "pro": TierConfig(tokens_per_minute=100, tokens_per_day=9)}
    )
    assert plan_tier(config, None, {}).rules == ()
    plan = plan_tier(config, "pro", {"tokens_per_day": 5000, "requests_per_minute": 7})
    assert [(r.name, r.limit) for r in plan.rules] == [
        ("requests_per_minute", 7),
        ("tokens_per_minute", 100),
        ("tokens_per_day", 5000),
    ]


def test_unknown_tier_is_refused_with_its_name() -> None:
    with pytest.raises(PermissionDenied, match="'gold'") as refused:
        plan_tier(LimitsConfig(), "gold", {})
    assert refused.value.code == "unknown_tier"


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [({"tokens_per_hour": 5}, "tokens_per_hour"), ({"tokens_per_day": 0}, "tokens_per_day")],
)
def test_bad_overrides_are_config_errors(overrides: dict[str, int], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        validate_overrides(overrides)


def test_cost_rounds_weighted_completion_tokens_up() -> None:
    config = LimitsConfig(tiers={"default": TierConfig(completion_token_weight=0.5)})
    plan = plan_tier(config, None, {})
    assert plan.token_cost(10, 3) == 12
    assert plan.token_cost(10, 4) == 12
