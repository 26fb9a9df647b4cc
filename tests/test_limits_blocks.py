"""A caller whose requests_per_minute is spent is refused before anything is spent on it."""

from __future__ import annotations

import math

import pytest

from llmserve.clock import ManualClock
from llmserve.config import LimitsConfig
from llmserve.errors import RateLimited
from llmserve.limits import Limiter
from llmserve.limits.blocks import MAX_BLOCKED, RequestBlocks
from llmserve.limits.windows import charge_for, make_rule
from tests.support.api import chat_body, make_config
from tests.test_limits_policy import FlakyStore


def limiter(tiers: dict, clock: ManualClock) -> tuple[Limiter, FlakyStore]:
    store = FlakyStore()
    config = LimitsConfig.model_validate({"default_tier": "t", "tiers": tiers})
    return Limiter(config, store, clock=clock), store  # type: ignore[arg-type]


async def test_a_spent_request_window_refuses_early_until_one_request_fits() -> None:
    clock = ManualClock(1_700_000_000.0)
    lim, store = limiter({"t": {"requests_per_minute": 2, "tokens_per_minute": 1000}}, clock)
    await lim.reserve("p", "t", {}, 10, 10)
    await lim.reserve("p", "t", {}, 10, 10)
    with pytest.raises(RateLimited):
        await lim.reserve("p", "t", {}, 10, 10)
    calls = store.calls
    clock.now += 1
    with pytest.raises(RateLimited) as refused:
        lim.refuse_early("p", "t", {})
    assert store.calls == calls  # the store was not asked
    error = refused.value
    assert error.limit == "requests_per_minute"
    # one request drains in 30 s; 1 s of them has passed (Retry-After rounds up)
    assert error.headers["Retry-After"] in ("29", "30")
    assert "try again in 29" in error.message
    assert error.headers["x-ratelimit-remaining-requests"] == "0"
    # the token window as of now: 40 tokens held, draining at 1000/60 per second
    assert error.headers["x-ratelimit-remaining-tokens"] == str(math.floor(1000 - (40 - 1000 / 60)))
    lim.refuse_early("q", "t", {})  # another caller is not blocked
    clock.now += 29
    lim.refuse_early("p", "t", {})  # one request fits again: no early refusal
    await lim.reserve("p", "t", {}, 10, 10)


async def test_a_token_window_refusal_is_not_remembered() -> None:
    """A smaller request could fit, and refunds of requests in flight free tokens early."""
    clock = ManualClock(1_700_000_000.0)
    lim, _ = limiter({"t": {"requests_per_minute": 100, "tokens_per_minute": 100}}, clock)
    await lim.reserve("p", "t", {}, 10, 80)
    with pytest.raises(RateLimited) as refused:
        await lim.reserve("p", "t", {}, 10, 80)
    assert refused.value.limit == "tokens_per_minute"
    lim.refuse_early("p", "t", {})
    await lim.reserve("p", "t", {}, 5, 5)


async def test_a_changed_tier_ends_the_block() -> None:
    clock = ManualClock(1_700_000_000.0)
    lim, _ = limiter({"t": {"requests_per_minute": 1}, "big": {"requests_per_minute": 100}}, clock)
    await lim.reserve("p", "t", {}, 1, 1)
    with pytest.raises(RateLimited):
        await lim.reserve("p", "t", {}, 1, 1)
    with pytest.raises(RateLimited):
        lim.refuse_early("p", "t", {})
    lim.refuse_early("p", "big", {})  # an admin moved the key to another tier
    lim.refuse_early("p", "t", {"requests_per_minute": 50})  # or gave it an override
    assert len(lim.blocks) == 0


def test_blocks_are_bounded() -> None:
    blocks = RequestBlocks()
    charge = charge_for(make_rule("requests_per_minute", 1), 1, 0.0)
    plan = object()
    for i in range(MAX_BLOCKED + 10):
        blocks.note_refusal(f"p{i}", plan, [charge], [1.0], now=float(i) * 100)
    assert len(blocks) <= MAX_BLOCKED  # the expired ones were dropped to make room
    with pytest.raises(RateLimited):
        blocks.check(f"p{MAX_BLOCKED + 9}", plan, now=(MAX_BLOCKED + 9) * 100.0)


async def test_an_early_refusal_does_not_read_the_body(app_client, tmp_path):
    """A blocked caller's next request is refused even with a body that is not JSON: the 429
    comes before the body is read or parsed."""
    from llmserve.engine.fake import FakeEngine
    from llmserve.limits import store_from_url

    config = make_config(tmp_path, limits={
        "default_tier": "t", "tiers": {"t": {"requests_per_minute": 1}}})  # fmt: skip
    lim = Limiter(config.limits, store_from_url("memory://", tmp_path / "l"))
    client = await app_client(config, FakeEngine("fake", 256), limiter=lim)
    assert (await client.post("/v1/chat/completions", json=chat_body(max_tokens=1))).status == 200
    refused = await client.post("/v1/chat/completions", json=chat_body(max_tokens=1))
    assert refused.status == 429  # by the store: now remembered
    early = await client.post("/v1/chat/completions", data=b"{not json",
                              headers={"Content-Type": "application/json"})  # fmt: skip
    assert early.status == 429
    body = await early.json()
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert int(early.headers["Retry-After"]) >= 59
    assert early.headers["x-ratelimit-remaining-requests"] == "0"
    await lim.close()


def test_a_refusal_is_reused_briefly_and_only_on_the_safe_side() -> None:
    blocks = RequestBlocks()
    charge = charge_for(make_rule("requests_per_minute", 60), 1, 0.0)
    plan = object()
    blocks.note_refusal("p", plan, [charge], [60.0], now=0.0)  # full: one fits in 1 s

    def refusal(now: float) -> RateLimited:
        with pytest.raises(RateLimited) as caught:
            blocks.check("p", plan, now)
        return caught.value

    first, soon, later = refusal(0.5), refusal(0.55), refusal(0.7)
    assert first is not soon  # a new exception each time (a raised one keeps its traceback)
    assert soon.message == first.message and soon.headers == first.headers
    assert first.headers["x-ratelimit-reset-requests"] == "59.5s"  # until the bucket is empty
    assert later.headers["x-ratelimit-reset-requests"] == "59.3s"
    soon.headers["Retry-After"] = "999"  # a caller changing its copy changes no later refusal
    assert refusal(0.56).headers["Retry-After"] == "1"
