"""Garbage-collector settings for serving: keep collections off the request path.

CPython's full (generation 2) collection scans every tracked object. After the engine has started,
the process holds hundreds of thousands of them (the libraries, the engine client, vLLM's and
torch's module state) that live as long as the process, so each full pass stalls the event loop
for tens of milliseconds, and every request in flight waits that long. `gc.freeze` moves all
objects that exist at that moment to a permanent generation that collections skip, as `vllm serve`
does after its startup. Objects created later (the requests') are collected as usual.

Every pass, young ones included, scans the objects of all requests in flight (a hundred or so
each: coroutines, futures, headers): 20-50 ms with 350 requests in flight on this project's
2-core test machine, during which no request moves. Python's default (a young pass per 700 net
allocations) runs such passes every few hundred milliseconds under load, and any threshold is
reached sooner or later, since CPython's count of net allocations drifts upwards when objects
older than the last pass are freed. Yet the request paths make no reference cycles (a test
checks each: successes, streams, refusals, hang-ups, engine failures), so those passes free
nothing. Serving therefore sets the automatic threshold so high that it is only a safety net
(`server.gc_gen0_threshold`), and runs one full collection every `server.gc_collect_seconds`
(60 s), which frees within a minute whatever cycles rare paths (library errors) make.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("llmserve.server")


def tune_collector(gen0_threshold: int) -> None:
    """Set how many net allocations of tracked objects start a young pass."""
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)


def freeze_heap() -> int:
    """Collect what is garbage now, then freeze the rest; returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


async def collect_every(seconds: float) -> None:
    """Run a full collection every `seconds`, forever (cancel the task to stop it)."""
    while True:
        await asyncio.sleep(seconds)
        started = time.perf_counter()
        freed = gc.collect()
        log.debug("garbage collection: %d objects freed in %.1f ms", freed,
                  (time.perf_counter() - started) * 1000)  # fmt: skip


class PauseRecorder:
    """A gc callback timing every pass: `observe(generation, seconds)` after each one.

    recorder = PauseRecorder(metrics.observe_gc_pause)
    recorder.install()      # ... recorder.remove()
    """

    def __init__(self, observe: Callable[[int, float], None]) -> None:
        self._observe = observe
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._observe(info["generation"], time.perf_counter() - self._started)

    def install(self) -> None:
        gc.callbacks.append(self)

    def remove(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)
