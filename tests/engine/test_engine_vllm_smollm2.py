"""The real SmolLM2-135M-Instruct model (prepared by `llmserve models prepare`) on vLLM."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from llmserve.engine.base import SamplingOptions
from tests.engine.conftest import SMOLLM2_DIR, child_pids, kill_leftovers
from tests.engine.helpers import collect

pytestmark = [
    pytest.mark.engine,
    pytest.mark.smollm2,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(
        not (SMOLLM2_DIR / "config.json").is_file(),
        reason=f"{SMOLLM2_DIR} is missing: run `llmserve models prepare`",
    ),
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def smollm2() -> AsyncIterator[object]:
    from llmserve.config import EngineConfig
    from llmserve.engine.vllm import VLLMEngine

    before = child_pids()
    engine = VLLMEngine(EngineConfig(model=str(SMOLLM2_DIR), max_model_len=2048))
    try:
        await engine.start()
        yield engine
    finally:
        await engine.close()
        assert not kill_leftovers(before)


async def test_greedy_answer_names_paris(smollm2) -> None:
    prompt = await smollm2.render_chat(
        [{"role": "user", "content": "What is the capital of France?"}]
    )
    result = await collect(smollm2, prompt, SamplingOptions(max_tokens=32, temperature=0.0), "p")
    assert "Paris" in result.text
    assert result.finish_reason == "stop"  # the model ends its answer itself


async def test_served_name_is_the_directory_name(smollm2) -> None:
    assert smollm2.model_name == "smollm2-135m-instruct"
