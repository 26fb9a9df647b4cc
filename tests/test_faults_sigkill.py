"""`llmserve up` SIGKILLed with streams in flight, then started again on the same config, with
each limiter store: memory:// (day and month usage in a state_dir) and redis://.

What must hold afterwards:

- the killed process's clients are not left hanging: its streams end at once with a transport
  error, and requests sent while no process listens are refused at once;
- the streams it was running never finished, so they are not in the usage ledger, and their
  worst-case holds (prompt + 1.5 x 600 tokens each) must not stay charged: with memory:// a
  dead process's holds are gone at restart; with Redis a hold that no live process renews is
  refunded after `limits.hold_lease_seconds` (2 s here), and the test reads past that;
- each process's ledger lines, its clients' 200s and its /metrics agree;
- `llmserve keys usage` (day and month windows) equals the whole ledger's cost, key by key, to
  the token: `prompt + ceil(1.5 * completion)` per request.

memory:// writes day and month usage to disk at most once a second, and a crash loses at most
that last second (docs/limits.md): the kill comes 1.5 s after the last request ended, so
nothing settled is lost and the comparison is exact.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.faults import (
    LEASE_SECONDS,
    REQUEST_BOUND,
    Findings,
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

FLUSH_SECONDS = 1.0  # how often memory:// writes day/month usage to its state_dir
STREAMS_PER_KEY = 2
OK = (200, None)
REFUSED = (429, "rate_limit_exceeded")


@pytest.fixture
def procs() -> Iterator[Processes]:
    with Processes() as started:
        yield started


def answered(outcomes: list[Outcome]) -> int:
    return sum(1 for o in outcomes if o.ended and o.status is not None)


@pytest.mark.parametrize("store", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def test_llmserve_sigkilled_with_streams_in_flight_restarts_with_usage_equal_to_the_ledger(
    tmp_path: Path, procs: Processes, store: str
) -> None:
    started = time.time()
    url = "memory://"
    if store == "redis":
        url = redis_url(procs.redis(tmp_path / "redis", appendonly=False))
    keys = make_keys(tmp_path)
    server = procs.llmserve(tmp_path, server_config(tmp_path, store=url))
    await asyncio.to_thread(server.start)
    findings = Findings()

    # 1. streams that will be in flight when the process dies, and load that ends before
    doomed = Load(server.base_url, keys, workers=0)
    async with doomed:
        doomed.phase = "killed"
        streams = [
            asyncio.create_task(doomed.send(keys[k], "long_stream", max_tokens=600))
            for k in ("k1", "k2")
            for _ in range(STREAMS_PER_KEY)
        ]
        async with Load(server.base_url, keys, workers=2) as first:
            await asyncio.sleep(1.5)
        samples = await settle_down(server.base_url, keys.values(), answered(first.outcomes))
        if store == "memory":
            await asyncio.sleep(FLUSH_SECONDS + 0.5)  # what the first load settled is on disk
        running = metric(samples, "llmserve_engine_running_requests")
        entries_first = ledger_entries(tmp_path)
        check_process_accounts(findings, keys, first.outcomes, entries_first, samples,
                               "first process")  # fmt: skip

        # 2. SIGKILL; clients keep sending; the same config comes back on the same port
        server.kill()
        killed_at = time.monotonic()
        async with Load(server.base_url, keys, workers=1, seed=8) as second:
            second.phase = "down"
            await asyncio.gather(*streams)
            streams_ended = time.monotonic() - killed_at
            await asyncio.sleep(0.5)  # requests meet a closed port meanwhile
            await asyncio.to_thread(server.start)
            second.phase = "restarted"
            await asyncio.sleep(1.5)

    # 3. the accounts
    cut = doomed.outcomes
    print(summary(first.outcomes + cut + second.outcomes))
    findings.check(
        len(cut) == 2 * STREAMS_PER_KEY
        and all(o.status == 200 and o.error not in (None, "hung") for o in cut),
        f"the streams in flight should all have been cut: {[o.describe() for o in cut]}",
    )
    findings.check(streams_ended < 3.0, f"the cut streams took {streams_ended:.1f}s to end")
    findings.equal("streams in the engine of the first process before the kill (/metrics)",
                   running, 2 * STREAMS_PER_KEY)  # fmt: skip
    check_no_hang(findings, first.outcomes + second.outcomes, REQUEST_BOUND)
    check_statuses(findings, first.outcomes, {OK, REFUSED})
    served = [o for o in second.outcomes if o.status is not None]
    refused = [o for o in second.outcomes if o.status is None]
    check_statuses(findings, served, {OK, REFUSED})
    findings.check(
        all(o.error == "ClientConnectorError" and o.phase == "down" for o in refused),
        "a request failed other than by a refused connection while the port was "
        f"closed: {[o.describe() for o in refused if o.error != 'ClientConnectorError'][:3]}",
    )
    findings.check(sum(o.status == 200 for o in served) >= 10,
                   "fewer than 10 requests served by the restarted process")  # fmt: skip

    samples = await settle_down(server.base_url, keys.values(), answered(served))
    entries = ledger_entries(tmp_path)
    check_process_accounts(findings, keys, served, entries[len(entries_first):], samples,
                           "restarted process")  # fmt: skip
    ledger_ids = {e.request_id for e in entries}
    findings.check(not {o.request_id for o in cut} & ledger_ids,
                   "a stream cut by the kill is in the ledger")  # fmt: skip
    check_settlements_sent(findings, samples, "restarted process")
    if store == "redis":  # the killed process's holds were last renewed before the kill
        await asyncio.sleep(max(0.0, killed_at + LEASE_SECONDS + 0.5 - time.monotonic()))
        usage = await keys_usage(server.config_path, keys.values())
        server.terminate()
    else:
        code = server.terminate()  # a graceful stop: the memory store writes what it has
        findings.equal("exit code of the restarted process on SIGTERM", code, 0)
        usage = await keys_usage(server.config_path, keys.values())
    holds = {o.key: 0 for o in cut}
    for o in cut:
        holds[o.key] += 1
    check_limiter_usage(findings, keys, usage, entries,
                        f"after SIGKILL ({store}; killed streams per key {holds}, each holding "
                        "prompt + 900)")  # fmt: skip
    if not same_utc_day(started):
        pytest.skip("the test crossed midnight UTC: the day window started again")
    findings.assert_none(f"llmserve SIGKILLed with streams in flight, store {store}:")
