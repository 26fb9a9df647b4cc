"""The real vLLM engine failing: bad settings at start, and the engine core dying under load."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from llmserve.engine.base import EngineError, EngineUnavailable
from llmserve.errors import EngineStartError
from tests.engine.conftest import child_pids, kill_leftovers, tiny_engine_config
from tests.engine.helpers import ExactOptions, wait_until

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="module")]

CHAT = [{"role": "user", "content": "Count to a thousand."}]


async def test_unknown_engine_option_fails_start_naming_it(tiny_model_dir) -> None:
    from llmserve.engine.vllm import VLLMEngine

    engine = VLLMEngine(tiny_engine_config(tiny_model_dir, options={"max_num_seq": 4}))
    with pytest.raises(EngineStartError, match=r"engine\.options\.max_num_seq\b.*max_num_seqs"):
        await engine.start()
    await engine.close()


async def test_a_start_cut_short_by_close_leaves_no_thread_and_no_engine_behind(
    tiny_model_dir,
) -> None:
    """A SIGTERM during start-up: the server cancels start() and closes the engine. On one node
    close() waits for vLLM to finish loading in its thread and shuts it down, so nothing of the
    engine outlives it."""
    import threading

    from llmserve.engine.vllm import VLLMEngine

    before = child_pids()
    engine = VLLMEngine(tiny_engine_config(tiny_model_dir, distributed_executor_backend="mp"))
    start = asyncio.create_task(engine.start())
    assert await wait_until(lambda: engine._start_thread is not None, timeout=30)
    await asyncio.sleep(1.0)  # vLLM is loading
    start.cancel()
    with pytest.raises(asyncio.CancelledError):
        await start
    await engine.close()
    assert not any(t.name == "llmserve-engine-start" for t in threading.enumerate())
    assert await wait_until(lambda: not (child_pids() - before), timeout=15)
    with pytest.raises(EngineUnavailable):
        await engine.start()


async def test_missing_model_directory_fails_start_with_a_hint(tmp_path) -> None:
    from llmserve.engine.vllm import VLLMEngine

    engine = VLLMEngine(tiny_engine_config(tmp_path / "smollm2-missing"))
    with pytest.raises(EngineStartError, match="llmserve models prepare"):
        await engine.start()


async def test_engine_core_death_is_reported_and_in_flight_requests_fail(tiny_model_dir) -> None:
    from llmserve.engine.vllm import VLLMEngine, _engine_core_processes

    before = child_pids()
    engine = VLLMEngine(tiny_engine_config(tiny_model_dir))
    try:
        await engine.start()
        prompt = await engine.render_chat(CHAT)
        first = asyncio.Event()

        async def consume() -> None:
            async for _ in engine.generate(prompt, ExactOptions(max_tokens=400), "doomed"):
                first.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(first.wait(), 30)
        (core,) = _engine_core_processes(engine._llm)
        os.kill(core.pid, signal.SIGKILL)

        with pytest.raises(EngineError):
            await asyncio.wait_for(task, 30)
        assert await wait_until(lambda: engine.dead is not None, timeout=15)
        with pytest.raises(EngineUnavailable):
            await engine.check_health()
        with pytest.raises(EngineUnavailable):
            async for _ in engine.generate(prompt, ExactOptions(max_tokens=4), "after"):
                pass
    finally:
        await engine.close()
        left = kill_leftovers(before)
    assert not left
    with pytest.raises(EngineUnavailable, match="shut down"):
        await engine.check_health()
