"""One request of `llmserve bench` against scripted responses (aioresponses) and a closed port."""

from __future__ import annotations

import itertools
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aioresponses import aioresponses

from llmserve.bench import stats
from llmserve.bench.client import Target, build_payload, join_url, send_request
from llmserve.bench.datasets import SampleRequest
from llmserve.bench.records import RATE_LIMIT_HEADERS, RequestResult

BASE = "http://bench.test"
SAMPLE = SampleRequest("hello there", 2, 3)


class _NoStreamWriter:
    output_size = 0


class CompatResponse(aiohttp.ClientResponse):
    """aioresponses 0.7.9 predates aiohttp 3.14's required `stream_writer` argument."""

    def __init__(self, method: str, url: Any, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", _NoStreamWriter())
        super().__init__(method, url, **kwargs)


def post(mock: aioresponses, path: str, **kwargs: Any) -> None:
    mock.post(f"{BASE}{path}", response_class=CompatResponse, **kwargs)


def chunk(text: str, *, chat: bool = False) -> str:
    choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
    return "data: " + json.dumps({"choices": [choice]}) + "\n\n"


def usage(prompt: int, completion: int) -> str:
    body = {"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion}}
    return "data: " + json.dumps(body) + "\n\n"


def ticking_clock(step: float = 0.25):
    """Each reading is `step` seconds after the previous one."""
    counter = itertools.count()
    return lambda: next(counter) * step


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def send(session: aiohttp.ClientSession, target: Target | None = None) -> RequestResult:
    target = target or Target(base_url=BASE, model="m", api_keys=("k1", "k2"))
    return await send_request(session, target, SAMPLE, index=1, clock=ticking_clock())


async def test_streamed_completion_is_timed_per_chunk(session: aiohttp.ClientSession) -> None:
    body = (
        chunk("a") + ": heartbeat\n\n" + chunk("b") + chunk("c") + usage(7, 3) + "data: [DONE]\n\n"
    )
    with aioresponses() as mock:
        post(mock, "/v1/completions", body=body, headers={"X-Queue-Wait-Ms": "12.5"})
        result = await send(session)
    # clock readings: 0 start, 0.25 / 0.5 / 0.75 at the three choices chunks
    assert result.success and result.status == 200
    assert result.ttft == 0.25 and result.itl == [0.25, 0.25] and result.latency == 0.75
    assert (result.output_tokens, result.prompt_len) == (3, 7)  # usage wins over estimates
    assert result.generated_text == "abc"
    assert result.headers == {"x-queue-wait-ms": "12.5"}
    assert result.api_key_index == 1  # index 1 of two keys


async def test_lora_modules_spread_requests_over_the_names_reproducibly() -> None:
    target = Target(base_url=BASE, model="base", lora_modules=("base", "lora-a", "lora-b"))
    models = [build_payload(target, SAMPLE, index)["model"] for index in range(300)]
    assert models == [build_payload(target, SAMPLE, index)["model"] for index in range(300)]
    counts = {name: models.count(name) for name in ("base", "lora-a", "lora-b")}
    assert sum(counts.values()) == 300 and min(counts.values()) > 70, counts
    assert build_payload(Target(base_url=BASE, model="m"), SAMPLE, 5)["model"] == "m"


async def test_payload_asks_for_usage_and_uses_the_chat_shape() -> None:
    chat = Target(base_url=f"{BASE}/v1/", model="m", endpoint="/v1/chat/completions")
    payload = build_payload(chat, SAMPLE)
    assert payload["messages"] == [{"role": "user", "content": "hello there"}]
    assert payload["max_completion_tokens"] == 3 and payload["stream"] is True
    assert payload["stream_options"] == {"include_usage": True}
    assert chat.url == f"{BASE}/v1/chat/completions"
    assert join_url("http://h:1/", "/v1/completions") == "http://h:1/v1/completions"


async def test_chat_role_chunk_counts_as_first_token_like_vllm(
    session: aiohttp.ClientSession,
) -> None:
    body = chunk("", chat=True) + chunk("Hi", chat=True) + "data: [DONE]\n\n"
    target = Target(base_url=BASE, model="m", endpoint="/v1/chat/completions")
    with aioresponses() as mock:
        post(mock, "/v1/chat/completions", body=body)
        result = await send(session, target)
    assert result.success and result.ttft == 0.25 and result.itl == [0.25]
    assert result.output_tokens is None and stats.output_len(result) == 2


async def test_connection_refused_is_recorded_not_raised(session: aiohttp.ClientSession) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    result = await send(session, Target(base_url=f"http://127.0.0.1:{port}", model="m"))
    assert not result.success
    assert (result.status, result.error_code) == (0, "connection_error")
    assert stats.error_key(result) == "no_response:connection_error"


async def test_http_500_records_the_openai_error(session: aiohttp.ClientSession) -> None:
    error = {"error": {"message": "boom", "type": "server_error", "code": "internal_error"}}
    with aioresponses() as mock:
        post(mock, "/v1/completions", status=500, payload=error)
        result = await send(session)
    assert not result.success and result.status == 500
    assert (result.error_code, result.error_message) == ("internal_error", "boom")


async def test_non_json_error_body_gets_an_http_code(session: aiohttp.ClientSession) -> None:
    with aioresponses() as mock:
        post(mock, "/v1/completions", status=502, body="<html>bad gateway</html>")
        result = await send(session)
    assert (result.status, result.error_code) == (502, "http_502")
    assert "bad gateway" in result.error_message


async def test_error_event_mid_stream_fails_the_request(session: aiohttp.ClientSession) -> None:
    error = {"error": {"message": "engine died", "type": "server_error", "code": "engine_error"}}
    body = chunk("a") + "data: " + json.dumps(error) + "\n\n"
    with aioresponses() as mock:
        post(mock, "/v1/completions", body=body)
        result = await send(session)
    assert not result.success and result.status == 200
    assert result.error_code == "engine_error" and result.error_message == "engine died"
    assert stats.error_key(result) == "200:engine_error"


async def test_stream_cut_before_done_is_truncated(session: aiohttp.ClientSession) -> None:
    with aioresponses() as mock:
        post(mock, "/v1/completions", body=chunk("a") + chunk("b"))
        result = await send(session)
    assert not result.success and result.error_code == "stream_truncated"


@pytest.mark.parametrize("payload", ["{not json", "[1, 2]"])
async def test_malformed_sse_payload_fails_the_request(
    session: aiohttp.ClientSession, payload: str
) -> None:
    with aioresponses() as mock:
        post(mock, "/v1/completions", body=chunk("a") + f"data: {payload}\n\n")
        result = await send(session)
    assert not result.success and result.error_code == "malformed_sse"


async def test_done_without_any_token_is_a_failure(session: aiohttp.ClientSession) -> None:
    with aioresponses() as mock:
        post(mock, "/v1/completions", body=usage(2, 0) + "data: [DONE]\n\n")
        result = await send(session)
    assert not result.success and result.error_code == "no_token"


async def test_429_keeps_limit_and_headers(session: aiohttp.ClientSession) -> None:
    error = {
        "error": {
            "message": "Rate limit reached for tokens per minute: limit 4000, used 3990.",
            "type": "rate_limit_error",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    headers = {"Retry-After": "2", **{h: "1" for h in RATE_LIMIT_HEADERS}}
    with aioresponses() as mock:
        post(mock, "/v1/completions", status=429, payload=error, headers=headers)
        result = await send(session)
    assert result.status == 429 and result.headers["retry-after"] == "2"
    assert stats.limit_hit(result) == "tokens_per_minute"
    assert stats.header_check([result])["ok"] is True


async def test_timeout_is_recorded(session: aiohttp.ClientSession) -> None:
    with aioresponses() as mock:
        post(mock, "/v1/completions", exception=TimeoutError())
        result = await send(session)
    assert (result.status, result.error_code) == (0, "timeout")
