"""Requests answered by the engine's own OpenAI frontend keep every gateway control: limits and
admission at each generation, exact settlement, the gateway's own errors, deadlines, fields.

The frontend here is scripted (it behaves like vLLM's handlers towards the gate, including
swallowing the gate's refusal into an error of its own); the real one is proven in
tests/engine/test_engine_openai_features.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from llmserve.engine.base import GenerationGate, JSONReply, StreamReply
from llmserve.engine.fake import FakeEngine
from llmserve.limits.limiter import Limiter
from llmserve.limits.stores import store_from_url
from llmserve.usage import UsageLedger, read_usage
from tests.support.api import chat_body, make_config, parse_sse

PROMPT_TOKENS = 7


class ScriptedFrontend:
    """Each generation: enter the gate with the request's max_tokens and n, emit `tokens`
    output tokens per choice, end with "stop"."""

    def __init__(self, tokens: int = 3, delay: float = 0.0) -> None:
        self.tokens = tokens
        self.delay = delay
        self.bodies: list[dict[str, Any]] = []

    def request_fields(self, route: str) -> frozenset[str]:
        return frozenset({"model", "messages", "max_tokens", "n", "stream", "tools", "priority",
                          "prompt", "input", "max_output_tokens"})  # fmt: skip

    async def handle(self, route: str, body: dict[str, Any], gate: GenerationGate) -> Any:
        self.bodies.append(dict(body))
        if route == "tokenize":  # no generation, as in vLLM
            return JSONReply(b'{"count": 1, "tokens": [1]}')
        n = int(body.get("n") or 1)
        max_tokens = int(body.get("max_tokens") or body.get("max_output_tokens") or 16)
        if body.get("stream"):
            return StreamReply(self._events(gate, n, max_tokens))
        try:
            produced = await self._generate(gate, n, max_tokens)
        except Exception as exc:  # vLLM's handlers turn errors into responses of their own
            return JSONReply(json.dumps({"error": str(exc)}).encode(), status=500)
        return JSONReply(json.dumps({"object": "chat.completion", "produced": produced}).encode())

    async def _generate(self, gate: GenerationGate, n: int, max_tokens: int) -> int:
        admitted = await gate.enter(PROMPT_TOKENS, max_tokens, n, 0)
        try:
            for _ in range(n * min(self.tokens, max_tokens)):
                await asyncio.sleep(self.delay)
                admitted.on_tokens(1)
            admitted.on_finish("stop")
        finally:
            await admitted.close()
        return n * min(self.tokens, max_tokens)

    async def _events(self, gate: GenerationGate, n: int, max_tokens: int) -> AsyncIterator[str]:
        admitted = await gate.enter(PROMPT_TOKENS, max_tokens, n, 0)
        try:
            for i in range(min(self.tokens, max_tokens)):
                admitted.on_tokens(1)
                yield f'data: {{"token": {i}}}\n\n'
            admitted.on_finish("stop")
            yield "data: [DONE]\n\n"
        finally:
            await admitted.close()


class EngineWithFrontend(FakeEngine):
    def __init__(self, frontend: ScriptedFrontend) -> None:
        super().__init__("fake", 256)
        self._scripted = frontend

    @property
    def frontend(self) -> ScriptedFrontend:  # type: ignore[override]
        return self._scripted


def _limited(tmp_path: Path, **tier: int):
    config = make_config(tmp_path, limits={"default_tier": "t", "tiers": {"t": tier}})
    limiter = Limiter(config.limits, store_from_url(config.limits.store, config.limits.state_dir))
    return config, limiter


async def test_a_request_the_fast_path_does_not_handle_reaches_the_frontend(app_client, tmp_path):
    config, limiter = _limited(tmp_path, requests_per_minute=100, tokens_per_minute=1000)
    frontend = ScriptedFrontend(tokens=3)
    ledger = UsageLedger(tmp_path / "usage.jsonl", max_bytes=1 << 20, backups=1)
    client = await app_client(config, EngineWithFrontend(frontend), limiter=limiter, ledger=ledger)
    body = chat_body(max_tokens=10, tools=[{"type": "function"}], metadata={"team": "a"},
                     user="u1", request_id="someone-elses-id")  # fmt: skip
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status == 200, await response.text()
    assert (await response.json())["produced"] == 3
    assert "x-ratelimit-remaining-tokens" in response.headers
    seen = frontend.bodies[0]
    assert seen["tools"] == [{"type": "function"}]
    assert not {"metadata", "user", "request_id"} & set(seen)  # gateway's or ignored
    ledger.close()
    (entry,) = read_usage(tmp_path / "usage.jsonl")
    assert (entry.prompt_tokens, entry.completion_tokens) == (PROMPT_TOKENS, 3)
    assert entry.metadata == {"team": "a"}


async def test_n_choices_reserve_n_times_max_tokens_and_the_refusal_is_the_gateways(
    app_client, tmp_path
):
    config, limiter = _limited(tmp_path, tokens_per_minute=40)
    client = await app_client(config, EngineWithFrontend(ScriptedFrontend()), limiter=limiter)
    fits = await client.post("/v1/chat/completions", json=chat_body(max_tokens=10, n=3))
    assert fits.status == 200  # 7 + 3 x 10 = 37 <= 40, settled to 7 + 3 x 3 = 16
    refused = await client.post("/v1/chat/completions", json=chat_body(max_tokens=10, n=3))
    assert refused.status == 429  # 16 + 37 > 40, although the frontend answered 500 itself
    assert (await refused.json())["error"]["code"] == "rate_limit_exceeded"
    assert "Retry-After" in refused.headers


async def test_streams_from_the_frontend_carry_rate_limit_headers(app_client, tmp_path):
    config, limiter = _limited(tmp_path, tokens_per_minute=1000)
    client = await app_client(config, EngineWithFrontend(ScriptedFrontend(tokens=2)),
                              limiter=limiter)  # fmt: skip
    response = await client.post("/v1/chat/completions",
                                 json=chat_body(max_tokens=5, n=2, stream=True))  # fmt: skip
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    assert "x-ratelimit-remaining-tokens" in response.headers
    events = parse_sse(await response.read())
    assert events == [b'data: {"token": 0}', b'data: {"token": 1}', b"data: [DONE]"]


async def test_a_refused_stream_gets_a_real_http_status(app_client, tmp_path):
    config, limiter = _limited(tmp_path, tokens_per_minute=10)
    client = await app_client(config, EngineWithFrontend(ScriptedFrontend()), limiter=limiter)
    response = await client.post("/v1/chat/completions",
                                 json=chat_body(max_tokens=50, n=2, stream=True))  # fmt: skip
    assert response.status == 429
    assert (await response.json())["error"]["code"] == "rate_limit_exceeded"


async def test_the_clients_deadline_ends_a_frontend_request_with_504(app_client, config):
    frontend = ScriptedFrontend(tokens=100, delay=0.02)
    client = await app_client(config, EngineWithFrontend(frontend))
    response = await client.post("/v1/chat/completions", json=chat_body(max_tokens=100, n=2),
                                 headers={"X-Request-Timeout": "0.2"})  # fmt: skip
    assert response.status == 504
    assert (await response.json())["error"]["code"] == "deadline_exceeded"


async def test_unknown_and_refused_fields_are_400s_that_name_them(app_client, config):
    client = await app_client(config, EngineWithFrontend(ScriptedFrontend()))
    unknown = await client.post("/v1/chat/completions", json=chat_body(frobnicate=1))
    assert unknown.status == 400
    assert (await unknown.json())["error"]["code"] == "unknown_parameter"
    beam = await client.post("/v1/chat/completions", json=chat_body(use_beam_search=True, n=2))
    error = (await beam.json())["error"]
    assert beam.status == 400 and error["param"] == "use_beam_search"
    too_much = {str(i): "x" for i in range(17)}
    big = await client.post("/v1/chat/completions", json=chat_body(n=2, metadata=too_much))
    assert big.status == 400 and (await big.json())["error"]["param"] == "metadata"


async def test_responses_needing_a_store_are_refused(app_client, config):
    client = await app_client(config, EngineWithFrontend(ScriptedFrontend()))
    body = {"model": "fake", "input": "hi", "previous_response_id": "resp_1"}
    response = await client.post("/v1/responses", json=body)
    assert response.status == 400
    assert (await response.json())["error"]["param"] == "previous_response_id"


async def test_tokenize_counts_against_requests_per_minute(app_client, tmp_path):
    config, limiter = _limited(tmp_path, requests_per_minute=2)
    client = await app_client(config, EngineWithFrontend(ScriptedFrontend()), limiter=limiter)
    statuses = [(await client.post("/tokenize", json={"prompt": "hi"})).status for _ in range(3)]
    assert statuses == [200, 200, 429]


async def test_without_a_frontend_the_fast_paths_refusal_stands(app_client, config, engine):
    client = await app_client(config, engine)
    tools = await client.post("/v1/chat/completions", json=chat_body(tools=[{"type": "x"}]))
    assert tools.status == 400
    assert (await tools.json())["error"]["param"] == "tools"
    responses = await client.post("/v1/responses", json={"model": "fake", "input": "hi"})
    assert responses.status == 400
    assert (await responses.json())["error"]["code"] == "unsupported_route"


class PriorityFrontend(ScriptedFrontend):
    """Records the engine priority the gate hands vLLM for the request's `priority`."""

    def __init__(self) -> None:
        super().__init__()
        self.engine_priorities: list[int] = []

    async def _generate(self, gate: GenerationGate, n: int, max_tokens: int) -> int:
        admitted = await gate.enter(PROMPT_TOKENS, max_tokens, n, self.requested)
        self.engine_priorities.append(admitted.engine_priority)
        await admitted.close()
        return 0

    async def handle(self, route: str, body: dict[str, Any], gate: GenerationGate) -> Any:
        self.requested = int(body.get("priority") or 0)
        return await super().handle(route, body, gate)


async def test_a_requests_priority_may_lower_its_urgency_never_raise_it(app_client, tmp_path):
    config = make_config(
        tmp_path,
        engine={"options": {"scheduling_policy": "priority"}},
        limits={"default_tier": "pro", "tiers": {"pro": {"priority": 10}}},
    )
    frontend = PriorityFrontend()
    client = await app_client(config, EngineWithFrontend(frontend))
    for requested in (-1000, 0, 5):  # vLLM: lower values are served first
        response = await client.post("/v1/chat/completions",
                                     json=chat_body(n=2, priority=requested))  # fmt: skip
        assert response.status == 200, await response.text()
    assert frontend.engine_priorities == [-10, 0, 5]  # never before the tier's own -10
