"""Data parallel on the real engine: two vLLM engines (ranks) behind one llmserve engine, each
running its share of the requests and reporting its own statistics."""

from __future__ import annotations

import asyncio

import pytest

from llmserve.engine.base import SamplingOptions
from tests.engine.conftest import child_pids, describe, kill_leftovers, tiny_engine_config

pytestmark = pytest.mark.engine


async def test_two_data_parallel_ranks_each_run_requests_and_report_their_own_stats(
    tiny_model_dir,
) -> None:
    from llmserve.engine.vllm import VLLMEngine

    before = child_pids()
    config = tiny_engine_config(tiny_model_dir, data_parallel_size=2, max_num_seqs=2,
                                cpu_kv_cache_bytes=128 * 1024 * 1024)  # fmt: skip
    engine = VLLMEngine(config)
    try:
        await engine.start()
        prompt = await engine.render_completion("Once upon a time")
        options = SamplingOptions(max_tokens=80, ignore_eos=True)

        async def run(i: int) -> int:
            return sum([d.num_tokens async for d in engine.generate(prompt, options, f"dp-{i}")])

        requests = [asyncio.ensure_future(run(i)) for i in range(4)]
        busiest = {0: 0, 1: 0}
        while not all(r.done() for r in requests):
            for rank in engine.stats().ranks:
                busiest[rank.rank] = max(busiest[rank.rank], rank.running)
            await asyncio.sleep(0.02)
        assert [r.result() for r in requests] == [80] * 4
        assert busiest[0] >= 1 and busiest[1] >= 1, busiest  # both engines worked
        assert [r.rank for r in engine.stats().ranks] == [0, 1]
    finally:
        await engine.close()
        left = sorted(child_pids() - before)
        where = describe(left)
        kill_leftovers(before)
    assert not left, f"engine processes left after close(): {where}"


def rank_pids(rank: int) -> list[int]:
    from pathlib import Path

    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                comm = (entry / "comm").read_text()
            except OSError:
                continue
            if f"EngineCore_DP{rank}".encode() in cmdline or f"DP{rank}" in comm:
                found.append(int(entry.name))
    return found


async def test_when_one_rank_dies_no_stream_is_cut_short_and_the_engine_is_dead(
    tiny_model_dir,
) -> None:
    """vLLM's policy, kept: one dead engine is a dead server (it drains and exits 1 for its
    supervisor to restart). No stream may end cut short as if it were complete."""
    import os
    import signal

    from llmserve.engine.base import EngineError
    from llmserve.engine.vllm import VLLMEngine

    before = child_pids()
    config = tiny_engine_config(tiny_model_dir, data_parallel_size=2, max_num_seqs=2,
                                cpu_kv_cache_bytes=128 * 1024 * 1024)  # fmt: skip
    engine = VLLMEngine(config)
    try:
        await engine.start()
        prompt = await engine.render_completion("Once upon a time")
        options = SamplingOptions(max_tokens=400, ignore_eos=True)

        started = [asyncio.Event() for _ in range(4)]

        async def run(i: int) -> str:
            tokens = 0
            try:
                async for delta in engine.generate(prompt, options, f"dies-{i}"):
                    tokens += delta.num_tokens
                    started[i].set()
            except EngineError:  # EngineUnavailable is one too
                return f"error after {tokens}"
            return f"complete with {tokens}"

        requests = [asyncio.ensure_future(run(i)) for i in range(4)]
        # every stream under way (and far from its 400th token) on both ranks: kill one
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
        [rank1] = rank_pids(1)
        os.kill(rank1, signal.SIGKILL)
        outcomes = await asyncio.wait_for(asyncio.gather(*requests), 60)
        # the dead rank's streams end with an error; one on the live rank may still run to its
        # end before vLLM declares the engine dead, but none is ever cut short and called done
        assert all(o.startswith("error") or o == "complete with 400" for o in outcomes), outcomes
        assert sum(o.startswith("error") for o in outcomes) >= 1, outcomes
        for _ in range(50):
            if engine.dead is not None:
                break
            await asyncio.sleep(0.1)
        assert engine.dead is not None
    finally:
        await engine.close()
        left = sorted(child_pids() - before)
        where = describe(left)
        kill_leftovers(before)
    assert not left, f"engine processes left after close(): {where}"
