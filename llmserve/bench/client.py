"""One streamed request over raw aiohttp, timed the way `vllm bench serve` times it.

Raw aiohttp rather than the openai SDK: under hundreds of concurrent streams the SDK's per-chunk
model parsing becomes the bottleneck and would be measured instead of the server.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from llmserve.bench.datasets import SampleRequest
from llmserve.bench.records import (
    CONNECTION_ERROR,
    KEPT_HEADERS,
    MALFORMED_SSE,
    NO_TOKEN,
    STREAM_TRUNCATED,
    TIMEOUT,
    RequestResult,
)
from llmserve.bench.sse import SSEDecoder

Clock = Callable[[], float]
CHAT_ENDPOINT = "/v1/chat/completions"
COMPLETIONS_ENDPOINT = "/v1/completions"


@dataclass(frozen=True, slots=True)
class Target:
    """Where and what to send; `api_keys` are used round-robin, one principal per key."""

    base_url: str
    model: str
    endpoint: str = COMPLETIONS_ENDPOINT
    api_keys: tuple[str, ...] = ()
    ignore_eos: bool = False
    extra_body: dict[str, Any] = field(default_factory=dict)
    # `--lora-modules`: each request names one of these, drawn per request (seeded by its
    # index), instead of `model`; any served name works (an adapter, the base model, an alias)
    lora_modules: tuple[str, ...] = ()

    def model_for(self, index: int) -> str:
        if not self.lora_modules:
            return self.model
        return random.Random(index).choice(self.lora_modules)

    @property
    def url(self) -> str:
        return join_url(self.base_url, self.endpoint)

    @property
    def is_chat(self) -> bool:
        return self.endpoint.rstrip("/").endswith("chat/completions")


def join_url(base_url: str, endpoint: str) -> str:
    """`http://h:8000` or `http://h:8000/v1` joined with `/v1/completions`, without `/v1/v1`."""
    base = base_url.rstrip("/")
    if base.endswith("/v1") and endpoint.startswith("/v1/"):
        base = base[: -len("/v1")]
    return base + endpoint


def build_payload(target: Target, sample: SampleRequest, index: int = 0) -> dict[str, Any]:
    payload: dict[str, Any] = {"model": target.model_for(index), "stream": True}
    if target.is_chat:
        payload["messages"] = [{"role": "user", "content": sample.prompt}]
        payload["max_completion_tokens"] = sample.expected_output_len
    else:
        payload["prompt"] = sample.prompt
        payload["max_tokens"] = sample.expected_output_len
    payload["stream_options"] = {"include_usage": True}
    if target.ignore_eos:
        payload["ignore_eos"] = True
    payload.update(target.extra_body)
    return payload


def request_headers(target: Target, key_index: int | None) -> dict[str, str]:
    if key_index is None:
        return {}
    return {"Authorization": f"Bearer {target.api_keys[key_index]}"}


async def send_request(
    session: aiohttp.ClientSession,
    target: Target,
    sample: SampleRequest,
    *,
    index: int = 0,
    clock: Clock,
) -> RequestResult:
    """Never raises for a failed request: the failure is recorded in the result."""
    key_index = index % len(target.api_keys) if target.api_keys else None
    result = RequestResult(index=index, prompt_len=sample.prompt_len, api_key_index=key_index)
    result.start_time = clock()
    try:
        async with session.post(
            target.url,
            json=build_payload(target, sample, index),
            headers=request_headers(target, key_index),
        ) as response:
            await _read_response(response, result, clock)
    except TimeoutError:
        _fail(result, TIMEOUT, "the request timed out")
    except aiohttp.ClientPayloadError as exc:
        _fail(result, STREAM_TRUNCATED, f"the stream broke off: {exc}")
    except aiohttp.ClientError as exc:
        code = STREAM_TRUNCATED if result.status else CONNECTION_ERROR
        _fail(result, code, f"{type(exc).__name__}: {exc}")
    if not result.success and result.latency == 0.0:
        result.latency = clock() - result.start_time
    return result


async def _read_response(
    response: aiohttp.ClientResponse, result: RequestResult, clock: Clock
) -> None:
    result.status = response.status
    result.headers = {h: response.headers[h] for h in KEPT_HEADERS if h in response.headers}
    if response.status != 200:
        _apply_error_body(result, await response.read())
        return
    await _read_stream(response, result, clock)


async def _read_stream(
    response: aiohttp.ClientResponse, result: RequestResult, clock: Clock
) -> None:
    stream = _StreamState(result, clock)
    decoder = SSEDecoder()
    async for chunk in response.content.iter_any():
        for payload in decoder.feed(chunk):
            if stream.take(payload):
                return
    for payload in decoder.flush():
        if stream.take(payload):
            return
    _fail(result, STREAM_TRUNCATED, "the server closed the stream before data: [DONE]")


class _StreamState:
    """Applies each SSE payload to the result; `take` returns True when the stream is over."""

    def __init__(self, result: RequestResult, clock: Clock) -> None:
        self.result = result
        self.clock = clock
        self.last_chunk_at: float | None = None
        self.text: list[str] = []

    def take(self, payload: str) -> bool:
        if payload.strip() == "[DONE]":
            self._finish()
            return True
        try:
            data = json.loads(payload)
        except json.JSONDecodeError:
            return _fail(self.result, MALFORMED_SSE, f"not JSON: {payload[:80]!r}")
        if not isinstance(data, dict):
            return _fail(self.result, MALFORMED_SSE, f"not a JSON object: {payload[:80]!r}")
        if "error" in data:
            _apply_error(self.result, data["error"])
            return True
        if data.get("choices"):
            self._on_choices(data["choices"])
        if isinstance(usage := data.get("usage"), dict):
            self._on_usage(usage)
        return False

    def _on_choices(self, choices: Any) -> None:
        now = self.clock()
        if self.last_chunk_at is None:
            self.result.ttft = now - self.result.start_time
        else:
            self.result.itl.append(now - self.last_chunk_at)
        self.last_chunk_at = now
        first = choices[0] if isinstance(choices, list) and isinstance(choices[0], dict) else {}
        delta = first.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else first.get("text")
        self.text.append(text if isinstance(text, str) else "")

    def _on_usage(self, usage: dict[str, Any]) -> None:
        if isinstance(tokens := usage.get("completion_tokens"), int):
            self.result.output_tokens = tokens
        if isinstance(prompt := usage.get("prompt_tokens"), int):
            self.result.prompt_len = prompt

    def _finish(self) -> None:
        if self.last_chunk_at is None:
            _fail(self.result, NO_TOKEN, "the stream ended without any choices chunk")
            return
        self.result.success = True
        self.result.latency = self.last_chunk_at - self.result.start_time
        self.result.generated_text = "".join(self.text)


def _fail(result: RequestResult, code: str, message: str) -> bool:
    result.success = False
    result.error_code = code
    result.error_message = message
    return True


def _apply_error(result: RequestResult, error: Any) -> None:
    error = error if isinstance(error, dict) else {"message": str(error)}
    code = error.get("code")
    result.success = False
    result.error_code = str(code) if code is not None else error.get("type") or "unknown"
    result.error_message = str(error.get("message") or "")
    result.error_param = str(error["param"]) if error.get("param") is not None else None


def _apply_error_body(result: RequestResult, body: bytes) -> None:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if isinstance(data, dict) and "error" in data:
        _apply_error(result, data["error"])
    else:
        _fail(result, f"http_{result.status}", body[:200].decode("utf-8", "replace"))


async def first_model(session: aiohttp.ClientSession, base_url: str, api_key: str | None) -> str:
    """The first model id of GET /v1/models (vLLM's default when --model is not given)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with session.get(join_url(base_url, "/v1/models"), headers=headers) as response:
        response.raise_for_status()
        data = await response.json()
    return str(data["data"][0]["id"])
