"""The real SmolLM2-135M-Instruct model (prepared by `llmserve models prepare`), over HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest
import pytest_asyncio

from tests.engine.conftest import SMOLLM2_DIR, child_pids, kill_leftovers

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
async def smollm2() -> AsyncIterator[SimpleNamespace]:
    from aiohttp.test_utils import TestClient, TestServer

    from llmserve.config import Config
    from llmserve.engine.vllm import VLLMEngine
    from llmserve.server.app import build_app

    config = Config.model_validate(
        {"engine": {"model": str(SMOLLM2_DIR), "max_model_len": 2048},
         "auth": {"enabled": False}, "usage": {"ledger": None}}
    )  # fmt: skip
    before = child_pids()
    engine = VLLMEngine(config.engine)
    client = TestClient(TestServer(build_app(config, engine)))
    await client.start_server()
    try:
        while (await client.get("/ready")).status != 200:
            assert engine.dead is None
            await asyncio.sleep(0.2)
        yield SimpleNamespace(client=client, engine=engine)
    finally:
        await client.close()
        left = kill_leftovers(before)
    assert not left


async def test_greedy_answer_over_http_names_paris(smollm2) -> None:
    response = await smollm2.client.post(
        "/v1/chat/completions",
        json={"model": "smollm2-135m-instruct", "temperature": 0, "max_tokens": 32,
              "messages": [{"role": "user",
                            "content": "What is the capital of France? Answer in one sentence."}]},
    )  # fmt: skip
    assert response.status == 200, await response.text()
    choice = (await response.json())["choices"][0]
    assert "Paris" in choice["message"]["content"]
    assert choice["finish_reason"] == "stop"  # the model ends its answer itself


async def test_served_name_is_the_directory_name(smollm2) -> None:
    assert smollm2.engine.model_name == "smollm2-135m-instruct"
    models = await (await smollm2.client.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == ["smollm2-135m-instruct"]


async def test_the_readmes_first_request_answers_paris_every_time(smollm2) -> None:
    """The README's first request sets no sampling field: the model's own defaults (written by
    `llmserve models prepare`) and the README's prompt must make the first answer a newcomer
    sees a sensible one. (Measured in float32 and in bfloat16: 48 of 48 samples name Paris;
    the bare "What is the capital of France?" only 8 of 12.)"""
    question = [{"role": "user",
                 "content": "What is the capital of France? Answer in one sentence."}]  # fmt: skip
    body = {"model": "smollm2-135m-instruct", "messages": question}
    answers = []
    for _ in range(3):
        response = await smollm2.client.post("/v1/chat/completions", json=body)
        assert response.status == 200, await response.text()
        answers.append((await response.json())["choices"][0]["message"]["content"])
    assert all("Paris" in answer for answer in answers), answers
