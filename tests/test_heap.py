"""Garbage-collector settings for serving (server/heap.py, run.serve)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest

from llmserve.server import run
from llmserve.server.heap import freeze_heap, tune_collector


@pytest.fixture
def collector() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_tune_collector_sets_only_the_young_threshold(collector: None) -> None:
    _, gen1, gen2 = gc.get_threshold()
    tune_collector(123_456)
    assert gc.get_threshold() == (123_456, gen1, gen2)


def test_freeze_heap_moves_live_objects_out_of_collections(collector: None) -> None:
    survivor = {"kept": [1, 2, 3]}
    frozen = freeze_heap()
    assert frozen == gc.get_freeze_count() > 1000
    assert all(survivor is not o for o in gc.get_objects())  # no pass scans it any more
    assert survivor["kept"] == [1, 2, 3]


def test_the_heap_is_frozen_and_tuned_only_once_the_engine_started(collector: None) -> None:
    default = gc.get_threshold()

    async def outcomes() -> list[tuple[int, int]]:
        seen = []
        for body in (_ok, _fails, _hangs):
            task = asyncio.ensure_future(body())
            await asyncio.sleep(0.01)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            gc.unfreeze()
            gc.set_threshold(*default)
            run._tune_once_started(True, 123_456, task)
            seen.append((gc.get_freeze_count(), gc.get_threshold()[0]))
        return seen

    started, failed, cancelled = asyncio.run(outcomes())
    assert started[0] > 1000 and started[1] == 123_456
    assert failed == cancelled == (0, default[0])


async def _ok() -> None:
    return None


async def _fails() -> None:
    raise RuntimeError("the engine did not start")


async def _hangs() -> None:
    await asyncio.sleep(60)


def test_collect_every_runs_full_collections_on_its_period(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmserve.server import heap

    passes: list[float] = []
    monkeypatch.setattr(heap.gc, "collect", lambda *a: passes.append(len(a)) or 0)

    async def run_for(seconds: float) -> None:
        task = asyncio.ensure_future(heap.collect_every(0.05))
        await asyncio.sleep(seconds)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run_for(0.32))
    assert 4 <= len(passes) <= 6  # every 0.05 s
    assert set(passes) == {0}  # gc.collect(): all generations


def test_every_collector_pass_is_exported_as_a_pause() -> None:
    from prometheus_client import CollectorRegistry

    from llmserve.config import MetricsConfig
    from llmserve.metrics import Metrics
    from llmserve.server.heap import PauseRecorder

    registry = CollectorRegistry()
    metrics = Metrics(registry, MetricsConfig(), include_default_registry=False)
    recorder = PauseRecorder(metrics.observe_gc_pause)
    recorder.install()
    try:
        gc.collect()
        gc.collect(0)
    finally:
        recorder.remove()
    gc.collect()  # not counted any more
    count = registry.get_sample_value
    assert count("llmserve_gc_pause_seconds_count", {"generation": "2"}) == 1
    assert count("llmserve_gc_pause_seconds_count", {"generation": "0"}) == 1
    total = count("llmserve_gc_pause_seconds_sum", {"generation": "2"})
    assert total is not None and 0 < total < 5
    assert recorder not in gc.callbacks
