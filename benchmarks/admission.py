"""What admission costs per request on one core: fast path, rejection, and queued handover.

    .venv/bin/python benchmarks/admission.py

Prints microseconds per request, best and median of 7 runs (best: the machine is shared and
noisy). No engine: only the queue's own work and the event loop's.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Awaitable, Callable

from llmserve.admission import AdmissionQueue
from llmserve.errors import ServiceUnavailable

RUNS = 7


async def fast_path(count: int) -> None:
    queue = AdmissionQueue(8, 64, 30.0)
    for _ in range(count):
        ticket = queue.enqueue(priority=1, tokens=100)
        await ticket.wait()
        ticket.release()


async def rejection(count: int) -> None:
    queue = AdmissionQueue(1, 0, 30.0)
    queue.enqueue()
    for _ in range(count):
        with contextlib.suppress(ServiceUnavailable):
            queue.enqueue()


WORKERS = 72  # 8 in the slots, 64 waiting: a full queue at the default depth


async def queued_handover(count: int) -> None:
    """72 workers loop through 8 slots: every request but the first 8 waits in the queue."""
    queue = AdmissionQueue(8, 64, 30.0)

    async def worker(priority: int) -> None:
        for _ in range(count // WORKERS):
            async with queue.slot(priority=priority, tokens=100):
                await asyncio.sleep(0)

    await asyncio.gather(*(worker(i % 3) for i in range(WORKERS)))


async def bare_workers(count: int) -> None:
    """The same workers without the queue: the event-loop cost the figure above includes."""

    async def worker() -> None:
        for _ in range(count // WORKERS):
            await asyncio.sleep(0)

    await asyncio.gather(*(worker() for _ in range(WORKERS)))


def microseconds_per_request(
    scenario: Callable[[int], Awaitable[None]], count: int
) -> tuple[float, float]:
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        asyncio.run(scenario(count))  # type: ignore[arg-type]
        times.append((time.perf_counter() - start) / count * 1e6)
    return min(times), statistics.median(times)


def main() -> None:
    for name, scenario, count in [
        ("fast path (enqueue, wait, release)", fast_path, 200_000),
        ("rejection at the door (503 built)", rejection, 200_000),
        ("queued handover, 3 tiers, 8 slots", queued_handover, 72_000),
        ("the same workers without a queue", bare_workers, 72_000),
    ]:
        best, median = microseconds_per_request(scenario, count)
        print(f"{name:38s} best {best:6.2f} us, median {median:6.2f} us per request")


if __name__ == "__main__":
    main()
