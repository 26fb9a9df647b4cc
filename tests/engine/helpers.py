"""Small helpers of the engine tests (collecting streams, waiting on the engine's own counters)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from llmserve.engine.base import Delta, Engine, Prompt, SamplingOptions


@dataclass(frozen=True, slots=True)
class ExactOptions(SamplingOptions):
    """SamplingOptions that run to max_tokens (EOS ignored): exact lengths on a random model."""

    ignore_eos: bool = True


@dataclass(frozen=True, slots=True)
class Collected:
    text: str
    num_tokens: int
    finish_reason: str | None
    deltas: int


async def collect(engine: Engine, prompt: Prompt, options: SamplingOptions, rid: str) -> Collected:
    deltas: list[Delta] = [d async for d in engine.generate(prompt, options, rid)]
    return Collected(
        text="".join(d.text for d in deltas),
        num_tokens=sum(d.num_tokens for d in deltas),
        finish_reason=deltas[-1].finish_reason if deltas else None,
        deltas=len(deltas),
    )


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll an engine-side condition (the engine runs in another process: no clock to inject)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True
