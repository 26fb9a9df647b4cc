"""Redis faults under load, against a real `llmserve up` (fake engine) and a real Redis.

Each test drives three API keys of a metered tier (completion tokens weigh 1.5; k3 has a tight
tokens_per_minute, so 429s are part of the load) with concurrent clients (chat and completions,
streaming and not, some streams abandoned after their first event), injects one fault, and
then proves:

- no request hangs: each ends within its bound with 200, 429 rate_limit_exceeded, or
  (fail-closed, store down) 503 limiter_unavailable, and every 429/503 has Retry-After;
- the usage ledger holds exactly the requests whose clients got a 200 (same request ids),
  with the tokens each response reported, and /metrics adds up to the same tokens, the same
  429s, 503s and unchecked admissions as the clients saw;
- once Redis is back and the load has ended, `llmserve keys usage` (the limiter's day and month
  windows, read from Redis by the real CLI) equals the ledger's cost for every key, to the
  token: `prompt + ceil(1.5 * completion)` per request. So: no phantom charge (a reservation
  whose reply timed out is not charged), no lost settlement (a request that ended during the
  outage is charged its real cost, not its worst case), and under `on_store_error: open` the
  requests admitted unchecked are charged their real cost once the store is back;
- the settlements the store could not take were all sent: /metrics shows none pending and
  none lost.

The accounts are read a hold lease (limits.hold_lease_seconds, 2 s here) after Redis came back:
a hold nobody settles is refunded by then. docs/failure-modes.md says what each fault costs.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.faults import (
    LEASE_SECONDS,
    REQUEST_BOUND,
    Findings,
    Key,
    Llmserve,
    Load,
    Outcome,
    Processes,
    check_limiter_usage,
    check_no_hang,
    check_process_accounts,
    check_settlements_sent,
    check_statuses,
    keys_usage,
    ledger_entries,
    make_keys,
    metric,
    redis_url,
    same_utc_day,
    server_config,
    settle_down,
    summary,
)

pytestmark = pytest.mark.redis

SOCKET_TIMEOUT = 0.25  # the store's socket_timeout: a pause longer than this is an outage
OK = (200, None)
REFUSED = (429, "rate_limit_exceeded")
UNAVAILABLE = (503, "limiter_unavailable")


@pytest.fixture
def procs() -> Iterator[Processes]:
    with Processes() as started:
        yield started


def answered(outcomes: list[Outcome]) -> int:
    return sum(1 for o in outcomes if o.ended and o.status is not None)


async def check_accounts(
    findings: Findings,
    tmp_path: Path,
    server: Llmserve,
    keys: dict[str, Key],
    outcomes: list[Outcome],
    label: str,
) -> dict:
    """Ledger, /metrics and keys usage, for a test whose one server process answered all of
    `outcomes` and whose whole ledger must be charged; returns the scrape."""
    samples = await settle_down(server.base_url, keys.values(), answered(outcomes))
    entries = ledger_entries(tmp_path)
    check_process_accounts(findings, keys, outcomes, entries, samples, label)
    check_settlements_sent(findings, samples, label)
    usage = await keys_usage(server.config_path, keys.values())
    check_limiter_usage(findings, keys, usage, entries, label)
    return samples


async def test_redis_killed_under_load_then_restarted_with_aof_no_request_hangs_and_usage_equals_the_ledger(  # noqa: E501
    tmp_path: Path, procs: Processes
) -> None:
    """SIGKILL Redis for 2.5 s under load (fail-closed), then restart it on its AOF. Two long
    streams (5 s) span the whole outage: admitted before it, settled after it, their leases
    not renewable meanwhile (a lease that ran out must not refund a hold settled later)."""
    started = time.time()
    redis = procs.redis(tmp_path / "redis", appendonly=True)
    keys = make_keys(tmp_path)
    server = procs.llmserve(tmp_path, server_config(tmp_path, store=redis_url(redis)))
    await asyncio.to_thread(server.start)

    long = Load(server.base_url, keys, workers=0)
    async with Load(server.base_url, keys) as load, long:
        spanning = [
            asyncio.create_task(long.send(keys[k], "long_stream", max_tokens=500))
            for k in ("k1", "k2")
        ]
        await asyncio.sleep(1.0)
        load.phase = "outage"
        redis.stop()  # SIGKILL: like a crash
        await asyncio.sleep(2.5)
        await asyncio.to_thread(redis.start)  # same port, same dir: it replays its AOF
        load.phase = "after"
        back = time.monotonic()
        await asyncio.sleep(1.5)
        await load.stop()
        await asyncio.gather(*spanning)
    await asyncio.sleep(max(0.0, back + LEASE_SECONDS + 0.5 - time.monotonic()))

    outcomes = load.outcomes + long.outcomes
    print(summary(outcomes))
    findings = Findings()
    check_no_hang(findings, outcomes, REQUEST_BOUND)
    check_statuses(findings, outcomes, {OK, REFUSED, UNAVAILABLE})
    outage = [o for o in load.outcomes if o.phase == "outage"]
    findings.check(any((o.status, o.code) == UNAVAILABLE for o in outage),
                   "no 503 limiter_unavailable while Redis was down: was it down?")  # fmt: skip
    findings.check(sum(o.status == 200 and o.phase == "after" for o in outcomes) >= 10,
                   "fewer than 10 requests served once Redis was back")  # fmt: skip
    findings.check(
        all(o.status == 200 and o.error is None for o in long.outcomes),
        f"streams spanning the outage: {[o.describe() for o in long.outcomes]}",
    )
    samples = await check_accounts(findings, tmp_path, server, keys, outcomes, "redis killed")
    findings.check(
        metric(samples, "llmserve_limiter_settlements_deferred_total") > 0,
        "no settlement was deferred: did any request end during the outage?",
    )
    if not same_utc_day(started):
        pytest.skip("the test crossed midnight UTC: the day window started again")
    findings.assert_none("Redis SIGKILLed under load, restarted with its AOF:")


@pytest.mark.parametrize("policy", ["closed", "open"])
async def test_redis_paused_past_the_socket_timeout_no_request_hangs_and_no_phantom_charges(
    tmp_path: Path, procs: Processes, policy: str
) -> None:
    """SIGSTOP Redis for 1.5 s (six socket timeouts) under load, then SIGCONT. The commands
    sent meanwhile wait in Redis's socket buffer and run when it resumes, after their caller
    gave up on them: a reservation whose client got a 503 must not be charged, a settlement
    whose reply timed out must not be applied twice. Under `open`, requests admitted unchecked
    during the pause are charged their real cost once Redis answers again."""
    started = time.time()
    redis = procs.redis(tmp_path / "redis", appendonly=False)
    keys = make_keys(tmp_path)
    config = server_config(tmp_path, store=redis_url(redis, SOCKET_TIMEOUT), on_store_error=policy)
    server = procs.llmserve(tmp_path, config)
    await asyncio.to_thread(server.start)

    async with Load(server.base_url, keys) as load:
        await asyncio.sleep(1.0)
        load.phase = "paused"
        redis.pause()
        try:
            await asyncio.sleep(1.5)
        finally:
            redis.resume()
        load.phase = "after"
        back = time.monotonic()
        await asyncio.sleep(1.5)
    await asyncio.sleep(max(0.0, back + LEASE_SECONDS + 0.5 - time.monotonic()))

    outcomes = load.outcomes
    print(summary(outcomes))
    findings = Findings()
    # the longest request generates 40 tokens at 100/s and waits for Redis twice (reserve,
    # settle), at most a socket timeout each; 2 s of slack for a loaded 2-core machine
    check_no_hang(findings, outcomes, 40 / 100 + 2 * SOCKET_TIMEOUT + 2.0)
    paused = [o for o in outcomes if o.phase == "paused"]
    if policy == "closed":
        check_statuses(findings, outcomes, {OK, REFUSED, UNAVAILABLE})
        findings.check(any((o.status, o.code) == UNAVAILABLE for o in paused),
                       "no 503 limiter_unavailable while Redis was paused")  # fmt: skip
    else:
        check_statuses(findings, outcomes, {OK, REFUSED})
        findings.check(any(o.status == 200 and not o.limited for o in paused),
                       "no request admitted unchecked while Redis was paused")  # fmt: skip
    findings.check(sum(o.status == 200 and o.phase == "after" for o in outcomes) >= 10,
                   "fewer than 10 requests served once Redis resumed")  # fmt: skip
    samples = await check_accounts(findings, tmp_path, server, keys, outcomes,
                                   f"redis paused ({policy})")  # fmt: skip
    findings.check(
        metric(samples, "llmserve_limiter_settlements_deferred_total") > 0,
        "no settlement was deferred: did the pause reach any request?",
    )
    if not same_utc_day(started):
        pytest.skip("the test crossed midnight UTC: the day window started again")
    findings.assert_none(f"Redis SIGSTOPped under load, on_store_error={policy}:")


async def test_redis_restarted_without_persistence_warns_keeps_serving_and_forgets_day_and_month_usage(  # noqa: E501
    tmp_path: Path, procs: Processes
) -> None:
    """A Redis without persistence restarts between two bursts of load (nothing in flight):
    llmserve warned at start-up, serves the second burst without one 503, and its day and
    month windows hold the second burst only: the first burst's usage is gone, those quotas
    start again (docs/limits.md). The ledger still has both bursts."""
    started = time.time()
    redis = procs.redis(tmp_path / "redis", appendonly=False)
    keys = make_keys(tmp_path)
    server = procs.llmserve(tmp_path, server_config(tmp_path, store=redis_url(redis)))
    await asyncio.to_thread(server.start)

    async with Load(server.base_url, keys) as first:
        await asyncio.sleep(1.5)
    await settle_down(server.base_url, keys.values(), answered(first.outcomes))  # all settled
    lost = ledger_entries(tmp_path)
    redis.stop()
    await asyncio.to_thread(redis.start)  # empty
    async with Load(server.base_url, keys, seed=8) as second:
        second.phase = "after"
        await asyncio.sleep(1.5)

    outcomes = first.outcomes + second.outcomes
    print(summary(outcomes))
    findings = Findings()
    check_no_hang(findings, outcomes, REQUEST_BOUND)
    check_statuses(findings, outcomes, {OK, REFUSED})  # not one 503: it kept serving
    findings.check(sum(o.status == 200 for o in second.outcomes) >= 10,
                   "fewer than 10 requests served after the restart")  # fmt: skip
    samples = await settle_down(server.base_url, keys.values(), answered(outcomes))
    entries = ledger_entries(tmp_path)
    check_process_accounts(findings, keys, outcomes, entries, samples, "no persistence")
    check_settlements_sent(findings, samples, "no persistence")
    usage = await keys_usage(server.config_path, keys.values())
    kept = entries[len(lost) :]
    check_limiter_usage(findings, keys, usage, kept, "no persistence, after the restart")
    findings.check(sum(e.prompt_tokens for e in lost) > 0, "the first burst used nothing")
    warning = re.search(r"WARNING.*has no persistence.*day and month", server.log())
    findings.check(warning is not None, "no start-up warning about a Redis without persistence")
    if not same_utc_day(started):
        pytest.skip("the test crossed midnight UTC: the day window started again")
    findings.assert_none("Redis without persistence restarted:")
