"""One load run: send the prompts at their arrival offsets, at most N in flight, until done or
stopped. Ctrl-C (the `stop` event) stops sending, cancels what is in flight and keeps every
request that completed, like a shortened run.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from llmserve.bench.client import Clock, Target, send_request
from llmserve.bench.datasets import SampleRequest
from llmserve.bench.records import RequestResult

# vLLM's client timeout: long enough for any generation, short enough to end a stuck run.
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=6 * 60 * 60)


@dataclass(frozen=True, slots=True)
class RunOutcome:
    results: list[RequestResult]  # completed requests (success or failure), in send order
    duration: float  # seconds from the first send to the last completion (or the stop)
    interrupted: bool


async def run_load(
    target: Target,
    samples: Sequence[SampleRequest],
    offsets: Sequence[float],
    *,
    max_concurrency: int | None = None,
    stop: asyncio.Event | None = None,
    on_result: Callable[[RequestResult], None] | None = None,
    clock: Clock = time.perf_counter,
    session: aiohttp.ClientSession | None = None,
) -> RunOutcome:
    stop = stop or asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        if session is None:
            session = await stack.enter_async_context(_new_session(max_concurrency))
        run = _Run(session, target, max_concurrency, stop, on_result, clock)
        return await run.execute(samples, offsets)


def _new_session(max_concurrency: int | None) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=max_concurrency or 0, ttl_dns_cache=300)
    return aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT)


class _Run:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        target: Target,
        max_concurrency: int | None,
        stop: asyncio.Event,
        on_result: Callable[[RequestResult], None] | None,
        clock: Clock,
    ) -> None:
        self.session = session
        self.target = target
        self.slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        self.stop = stop
        self.on_result = on_result
        self.clock = clock
        self.results: list[RequestResult] = []

    async def execute(
        self, samples: Sequence[SampleRequest], offsets: Sequence[float]
    ) -> RunOutcome:
        start = self.clock()
        tasks = [
            asyncio.create_task(self._one(index, sample, self.clock()))
            async for index, sample in self._arrivals(samples, offsets, start)
        ]
        if tasks and not self.stop.is_set():
            await self._wait_all_or_stop(tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.results.sort(key=lambda r: r.index)
        return RunOutcome(self.results, self.clock() - start, self.stop.is_set())

    async def _arrivals(
        self, samples: Sequence[SampleRequest], offsets: Sequence[float], start: float
    ) -> AsyncIterator[tuple[int, SampleRequest]]:
        for index, (sample, offset) in enumerate(zip(samples, offsets, strict=True)):
            delay = start + offset - self.clock()
            if delay > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), delay)
            if self.stop.is_set():
                return
            yield index, sample

    async def _wait_all_or_stop(self, tasks: list[asyncio.Task[None]]) -> None:
        stopped = asyncio.create_task(self.stop.wait())
        everything: asyncio.Future[Any] = asyncio.gather(*tasks, return_exceptions=True)
        waited: list[asyncio.Future[Any]] = [stopped, everything]
        await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()

    async def _one(self, index: int, sample: SampleRequest, arrival: float) -> None:
        async with self.slots or contextlib.nullcontext():
            result = await send_request(
                self.session, self.target, sample, index=index, clock=self.clock
            )
        result.client_queue_time = result.start_time - arrival
        self.results.append(result)
        if self.on_result is not None:
            self.on_result(result)
