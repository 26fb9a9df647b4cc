"""`engine.reasoning_parser`: a reasoning model's thinking is answered apart from its content,
in whole messages and in streamed deltas, as `vllm serve --reasoning-parser` answers it.

The tiny model's tokenizer has `<think>` and `</think>`; with the `deepseek_r1` parser (whose
models open their thinking in the prompt), output with no `</think>` is all reasoning.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest
import pytest_asyncio

from tests.engine.conftest import child_pids, kill_leftovers, tiny_engine_config

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="module")]
BODY = {"model": "tiny", "max_tokens": 8, "ignore_eos": True, "temperature": 0,
        "messages": [{"role": "user", "content": "Think."}]}  # fmt: skip


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def api(tiny_model_dir) -> AsyncIterator[SimpleNamespace]:
    from aiohttp.test_utils import TestClient, TestServer

    from llmserve.config import Config
    from llmserve.engine.vllm import VLLMEngine
    from llmserve.server.app import build_app

    engine_config = tiny_engine_config(tiny_model_dir, reasoning_parser="deepseek_r1")
    settings = {"auth": {"enabled": False}, "usage": {"ledger": None}}
    config = Config.model_validate({"engine": engine_config.model_dump(), **settings})
    before = child_pids()
    engine = VLLMEngine(config.engine)
    client = TestClient(TestServer(build_app(config, engine)))
    await client.start_server()
    try:
        while (await client.get("/ready")).status != 200:
            assert engine.dead is None
            await asyncio.sleep(0.2)
        yield SimpleNamespace(client=client)
    finally:
        await client.close()
        left = kill_leftovers(before)
    assert not left


async def test_reasoning_is_answered_apart_from_the_content(api) -> None:
    response = await api.client.post("/v1/chat/completions", json=BODY)
    assert response.status == 200, await response.text()
    body = await response.json()
    message = body["choices"][0]["message"]
    assert message["reasoning"]  # everything before a `</think>` that never came
    assert not message["content"]
    assert body["usage"]["completion_tokens"] == 8


async def test_streamed_reasoning_arrives_in_its_own_deltas(api) -> None:
    response = await api.client.post("/v1/chat/completions", json={**BODY, "stream": True})
    assert response.status == 200
    reasoning, content = "", ""
    for line in (await response.text()).split("\n\n"):
        if not line.startswith("data: {"):
            continue
        for choice in json.loads(line.removeprefix("data: "))["choices"]:
            reasoning += choice["delta"].get("reasoning") or ""
            content += choice["delta"].get("content") or ""
    assert reasoning and not content
