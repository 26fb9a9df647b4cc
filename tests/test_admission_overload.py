"""Overload: 500 concurrent requests against max_concurrency 8 and max_depth 32.

Every request ends admitted-and-completed or rejected with Retry-After; none hangs (the whole
run is bounded by a timeout); the engine never runs more than 8 at once; the queue ends empty.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from llmserve.admission import AdmissionQueue, DeadlineExceeded, ManualClock
from llmserve.engine.base import Prompt, SamplingOptions
from llmserve.engine.fake import FakeEngine
from llmserve.errors import ServiceUnavailable

CLIENTS, MAX_CONCURRENCY, MAX_DEPTH = 500, 8, 32
PROMPT = Prompt(text="hello there", token_ids=None, num_tokens=2)


async def arrive_in_waves(index: int) -> None:
    """Spread arrivals: client i arrives after i // 25 turns of the event loop (20 waves)."""
    for _ in range(index // 25):
        await asyncio.sleep(0)


async def stream_through_queue(queue: AdmissionQueue, engine: FakeEngine, index: int) -> str:
    await arrive_in_waves(index)
    options = SamplingOptions(max_tokens=64, priority=index % 3)
    try:
        async with queue.slot(priority=index % 3, tokens=66) as _ticket:
            tokens = 0
            async for delta in engine.generate(PROMPT, options, f"req-{index}"):
                tokens += delta.num_tokens
            assert tokens == 64
            return "completed"
    except ServiceUnavailable as error:
        assert error.status == 503
        assert int(error.headers["Retry-After"]) >= 1
        return error.code or "?"


async def test_500_clients_all_end_completed_or_rejected_and_engine_sees_at_most_8():
    queue = AdmissionQueue(MAX_CONCURRENCY, MAX_DEPTH, max_wait_seconds=30.0)
    engine = FakeEngine(max_num_seqs=MAX_CONCURRENCY)
    clients = [stream_through_queue(queue, engine, i) for i in range(CLIENTS)]
    outcomes = Counter(await asyncio.wait_for(asyncio.gather(*clients), timeout=30))

    assert sum(outcomes.values()) == CLIENTS
    assert set(outcomes) == {"completed", "server_overloaded"}
    assert outcomes["completed"] > MAX_CONCURRENCY + MAX_DEPTH  # later waves got in too
    assert engine.max_running == MAX_CONCURRENCY  # saturated, never above
    assert len(engine.finished) == outcomes["completed"] and not engine.aborted
    assert (queue.in_flight, queue.depth, queue.queued_tokens) == (0, 0, 0)
    assert queue._timer is None and not queue._expiries


async def fake_engine_steps(clock: ManualClock, queue: AdmissionQueue, running: list[int]) -> None:
    """An engine whose every step takes 10 ms of the fake clock (and lets expiry run)."""
    running[0] += 1
    running[1] = max(running[1], running[0])
    try:
        for _ in range(20):
            clock.advance(0.01)
            queue.expire()
            await asyncio.sleep(0)
    finally:
        running[0] -= 1


async def request_with_deadline(
    queue: AdmissionQueue, clock: ManualClock, running: list[int], index: int
) -> str:
    await arrive_in_waves(index)
    deadline = clock() + 1.0 if index % 5 == 0 else None
    try:
        async with queue.slot(priority=index % 3, tokens=10, deadline=deadline):
            await fake_engine_steps(clock, queue, running)
            return "completed"
    except ServiceUnavailable as error:
        assert int(error.headers["Retry-After"]) >= 1
        return error.code or "?"
    except DeadlineExceeded:
        return "deadline"


async def test_500_clients_with_waits_longer_than_the_queue_allows():
    clock = ManualClock()
    queue = AdmissionQueue(
        MAX_CONCURRENCY, MAX_DEPTH, max_wait_seconds=2.0, clock=clock, auto_expire=False
    )
    running = [0, 0]  # now, peak
    clients = [request_with_deadline(queue, clock, running, i) for i in range(CLIENTS)]
    outcomes = Counter(await asyncio.wait_for(asyncio.gather(*clients), timeout=30))

    assert sum(outcomes.values()) == CLIENTS
    # a deadline the queue predicts cannot be met is refused at the door (server_overloaded);
    # one it could not foresee still ends as a deadline while waiting
    assert {"completed", "server_overloaded", "queue_timeout"} <= set(outcomes)
    assert set(outcomes) <= {"completed", "server_overloaded", "queue_timeout", "deadline"}
    assert running[1] == MAX_CONCURRENCY
    assert (queue.in_flight, queue.depth, queue.queued_tokens) == (0, 0, 0)
    assert not queue._expiries
