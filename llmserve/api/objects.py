"""OpenAI response objects: whole responses, and SSE chunks encoded with one json.dumps each.

A stream's chunks differ only in their text, so each `ChunkEncoder` pre-encodes the bytes around
the text once; the hot path encodes just the delta string.
"""

from __future__ import annotations

import json
import random
from typing import Any

from aiohttp import web

from llmserve.engine.catalog import ServedModel

DONE = b"data: [DONE]\n\n"

# ASCII-only output: any text (even lone surrogates from a broken detokenizer) encodes safely.
_dumps = json.JSONEncoder(separators=(",", ":")).encode


def json_response(
    body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A compact JSON response (aiohttp's json_response pretty-prints with spaces)."""
    return web.Response(
        body=_dumps(body).encode(), status=status, headers=headers,
        content_type="application/json",
    )  # fmt: skip


_ids = random.Random()  # seeded from os.urandom; ids must be unique, not secret


def json_bytes_response(
    body: bytes, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON response from an already encoded body."""
    return web.Response(body=body, status=status, headers=headers, content_type="application/json")


def new_id(prefix: str) -> str:
    """`prefix` + 24 random hex digits (96 bits), without a system call per id."""
    return f"{prefix}{_ids.getrandbits(96):024x}"


def sse_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + _dumps(payload).encode() + b"\n\n"


def sse_comment(text: str) -> bytes:
    return b": " + text.replace("\n", " ").encode() + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class ChunkEncoder:
    """Builds the SSE events of one streamed chat completion or text completion."""

    def __init__(self, *, chat: bool, response_id: str, created: int, model: str,
                 include_usage: bool) -> None:  # fmt: skip
        self.chat = chat
        self._head = {
            "id": response_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": model,
        }
        self.include_usage = include_usage
        prefix = _dumps({**self._head, "choices": []})[:-3]  # drop `[]}`
        tail = ',"usage":null}' if include_usage else "}"
        if chat:
            self._text_prefix = (f'data: {prefix}[{{"index":0,"delta":{{"content":').encode()
            self._text_suffix = f'}},"logprobs":null,"finish_reason":null}}]{tail}\n\n'.encode()
        else:
            self._text_prefix = (f'data: {prefix}[{{"index":0,"text":').encode()
            self._text_suffix = f',"logprobs":null,"finish_reason":null}}]{tail}\n\n'.encode()

    def role(self) -> bytes:
        """The first chat chunk, announcing the assistant role (OpenAI sends it first)."""
        return self._event({"index": 0, "delta": {"role": "assistant", "content": ""},
                            "logprobs": None, "finish_reason": None})  # fmt: skip

    def text(self, text: str) -> bytes:
        return self._text_prefix + _dumps(text).encode() + self._text_suffix

    def finish(self, reason: str) -> bytes:
        if self.chat:
            choice = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": reason}
        return self._event(choice)

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return sse_event({**self._head, "choices": [],
                          "usage": usage(prompt_tokens, completion_tokens)})  # fmt: skip

    def _event(self, choice: dict[str, Any]) -> bytes:
        payload: dict[str, Any] = {**self._head, "choices": [choice]}
        if self.include_usage:
            payload["usage"] = None
        return sse_event(payload)


def chat_completion(*, response_id: str, created: int, model: str, text: str,
                    finish_reason: str | None, prompt_tokens: int,
                    completion_tokens: int) -> dict[str, Any]:  # fmt: skip
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_json(*, chat: bool, response_id: str, created: int, model: str, text: str,
                    finish_reason: str | None, prompt_tokens: int,
                    completion_tokens: int) -> bytes:  # fmt: skip
    """`chat_completion(...)` or `text_completion(...)` encoded, byte for byte, from a template:
    only the strings go through the JSON encoder (this runs once per request)."""
    reason = "null" if finish_reason is None else _dumps(finish_reason)
    if chat:
        kind = "chat.completion"
        choice = (f'{{"index":0,"message":{{"role":"assistant","content":{_dumps(text)}}},'
                  f'"logprobs":null,"finish_reason":{reason}}}')  # fmt: skip
    else:
        kind = "text_completion"
        choice = f'{{"index":0,"text":{_dumps(text)},"logprobs":null,"finish_reason":{reason}}}'
    total = prompt_tokens + completion_tokens
    return (
        f'{{"id":{_dumps(response_id)},"object":"{kind}","created":{int(created)},'
        f'"model":{_dumps(model)},"choices":[{choice}],"usage":{{"prompt_tokens":'
        f'{int(prompt_tokens)},"completion_tokens":{int(completion_tokens)},'
        f'"total_tokens":{int(total)}}}}}'
    ).encode()


def text_completion(*, response_id: str, created: int, model: str, text: str,
                    finish_reason: str | None, prompt_tokens: int,
                    completion_tokens: int) -> dict[str, Any]:  # fmt: skip
    return {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def model_list(models: list[ServedModel], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_object(m, created) for m in models]}


def model_object(model: ServedModel, created: int) -> dict[str, Any]:
    """OpenAI's model object, with vLLM's `root` (the model the name runs: the base model or
    an adapter, itself unless an alias) and `parent` (an adapter's base model, else null)."""
    return {
        "id": model.name, "object": "model", "created": created, "owned_by": "llmserve",
        "root": model.root, "parent": model.parent,
    }  # fmt: skip
