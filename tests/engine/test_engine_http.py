"""The HTTP API (build_app) on the real vLLM engine with the tiny model: the whole request path."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest
import pytest_asyncio

from tests.engine.conftest import child_pids, kill_leftovers, tiny_engine_config
from tests.engine.helpers import wait_until

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="module")]

MESSAGES = [{"role": "user", "content": "Say something."}]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def api(tiny_model_dir) -> AsyncIterator[SimpleNamespace]:
    """One app and engine for the module; the app's cleanup closes the engine."""
    from aiohttp.test_utils import TestClient, TestServer

    from llmserve.admission import AdmissionQueue
    from llmserve.config import Config
    from llmserve.engine.vllm import VLLMEngine
    from llmserve.server.app import build_app

    engine_config = tiny_engine_config(tiny_model_dir)
    config = Config.model_validate(
        {
            "engine": engine_config.model_dump(),
            "auth": {"enabled": False},
            "usage": {"ledger": None},
            "queue": {"max_depth": 8},
        }
    )
    before = child_pids()
    engine = VLLMEngine(config.engine)
    admission = AdmissionQueue.from_config(config)
    client = TestClient(TestServer(build_app(config, engine, admission=admission)))
    await client.start_server()
    try:
        first = await client.get("/ready")
        first_ready = (first.status, await first.json())
        ready = await poll_ready(client, timeout=180)
        yield SimpleNamespace(client=client, engine=engine, first_ready=first_ready, ready=ready)
    finally:
        await client.close()
        left = kill_leftovers(before)
    assert not left, f"engine processes left: {left}"


async def poll_ready(client, timeout: float) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while (await client.get("/ready")).status != 200:
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True


def unfinished(engine) -> int:
    return engine._llm.get_num_unfinished_requests()


async def sse_events(response) -> list[str]:
    body = (await response.read()).decode()
    return [line[len("data: ") :] for line in body.split("\n") if line.startswith("data: ")]


async def test_ready_is_503_while_loading_then_200(api) -> None:
    status, body = api.first_ready
    assert status == 503
    assert body["error"]["code"] == "engine_unavailable"
    assert api.ready
    response = await api.client.get("/ready")
    assert response.status == 200
    assert (await response.json())["model"] == "tiny"


async def test_chat_completion_counts_prompt_tokens_like_the_engine(api) -> None:
    expected = (await api.engine.render_chat(MESSAGES)).num_tokens
    response = await api.client.post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": MESSAGES, "max_tokens": 10, "temperature": 0},
    )
    assert response.status == 200, await response.text()
    body = await response.json()
    usage = body["usage"]
    assert usage["prompt_tokens"] == expected
    assert 1 <= usage["completion_tokens"] <= 10
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    choice = body["choices"][0]
    assert choice["finish_reason"] in ("stop", "length")
    assert choice["message"]["role"] == "assistant"


async def test_streaming_chat_ends_with_finish_reason_usage_and_done(api) -> None:
    response = await api.client.post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": MESSAGES, "max_tokens": 12, "stream": True,
              "stream_options": {"include_usage": True}},
    )  # fmt: skip
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = await sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    finishes = [c["choices"][0]["finish_reason"] for c in chunks[:-1] if c["choices"]]
    assert finishes[-1] in ("stop", "length")
    assert 1 <= usage["completion_tokens"] <= 12


async def test_completions_endpoint_generates(api) -> None:
    response = await api.client.post(
        "/v1/completions", json={"model": "tiny", "prompt": "def f(x):", "max_tokens": 6}
    )
    assert response.status == 200, await response.text()
    body = await response.json()
    assert (
        body["usage"]["prompt_tokens"]
        == (await api.engine.render_completion("def f(x):")).num_tokens
    )
    assert 1 <= body["usage"]["completion_tokens"] <= 6


async def test_too_long_prompt_is_a_400_with_the_numbers(api) -> None:
    response = await api.client.post(
        "/v1/completions", json={"model": "tiny", "prompt": "x = 1\n" * 200, "max_tokens": 200}
    )
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["code"] == "context_length_exceeded"
    assert "512" in error["message"]


async def test_seeded_requests_are_safe_and_reproducible_over_http(api) -> None:
    async def ask(seed: int, words: int) -> str:
        prompt = "alpha beta gamma " * words
        response = await api.client.post(
            "/v1/completions",
            json={"model": "tiny", "prompt": prompt, "max_tokens": 8, "seed": seed,
                  "temperature": 1.0},
        )  # fmt: skip
        assert response.status == 200, await response.text()
        return (await response.json())["choices"][0]["text"]

    texts = await asyncio.gather(*(ask(7, n) for n in (1, 10, 30, 55)))
    assert len(texts) == 4
    assert await ask(11, 30) == await ask(11, 30)
    assert (await api.client.get("/ready")).status == 200


async def test_client_disconnect_aborts_the_request_in_the_engine(api) -> None:
    assert await wait_until(lambda: unfinished(api.engine) == 0)
    response = await api.client.post(
        "/v1/completions",
        json={"model": "tiny", "prompt": "start", "max_tokens": 400, "stream": True},
    )
    assert response.status == 200
    await response.content.readline()  # the first event is flowing
    assert unfinished(api.engine) == 1
    response.close()  # drop the connection mid-stream
    assert await wait_until(lambda: unfinished(api.engine) == 0, timeout=15)


async def test_more_streams_than_max_num_seqs_are_answered_or_refused_cleanly(api) -> None:
    """40 streams against 16 engine slots and 8 queue places: each one either streams to
    [DONE] or gets a 503 with Retry-After; the engine never holds more than 16."""
    peak = 0
    stop = asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, unfinished(api.engine))
            await asyncio.sleep(0.005)

    async def one() -> str:
        body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 24, "stream": True}
        response = await api.client.post("/v1/chat/completions", json=body)
        if response.status == 503:
            assert int(response.headers["Retry-After"]) >= 1
            return (await response.json())["error"]["code"]
        assert response.status == 200
        events = await sse_events(response)
        assert events[-1] == "[DONE]", events[-3:]
        return "complete"

    watcher = asyncio.create_task(watch())
    async with asyncio.timeout(240):
        outcomes = await asyncio.gather(*(one() for _ in range(40)))
    stop.set()
    await watcher
    assert set(outcomes) <= {"complete", "server_overloaded"}
    assert outcomes.count("complete") >= 24  # 16 running + 8 waiting, at least
    assert peak <= 16
    assert await wait_until(lambda: unfinished(api.engine) == 0, timeout=30)
