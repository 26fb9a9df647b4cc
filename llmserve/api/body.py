"""Reading a JSON request body: content type and size are checked before parsing, the body is
parsed once (the fast path and the engine's frontend share the result), and its shape is
bounded before anything validates it.

What one request can make the event loop do is bounded here (BENCHMARKS.md, "Huge invalid
bodies"). The body is at most `server.max_body_bytes`. Parsing costs time in proportion to the
number of values, not bytes: up to 130 ms for 4 MiB of small values, in one C call that holds
the GIL throughout. So a body with more values than `server.max_json_values` is refused before
it is parsed, by a count of its commas and brackets outside strings (`values_at_least`, 2-25 ms
for 4 MiB), and what is parsed holds at most about twice that many. Validation costs time in
proportion to the values too (pydantic's errors for a list of two million wrong items took
seconds to build), so the counts (`server.max_messages`, `max_prompts`, `max_json_values`,
`max_json_depth`) are checked before any validation runs, each a 400 that names its setting.
Bodies above `server.json_thread_bytes` are counted and parsed on one worker thread. That makes
nothing cheaper (the GIL), but the event loop then waits for one such step at a time, not for
every huge body that arrived at once: a quarter off the median /health latency under a flood of
them, nothing off the worst.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic_core import from_json

from llmserve.config import ServerConfig
from llmserve.errors import InvalidRequest, PayloadTooLarge, RequestTimeout, UnsupportedMediaType


async def read_json_body(
    request: web.Request, max_bytes: int, timeout_seconds: float | None = None
) -> bytes:
    """The body, or 415 (not JSON), 413 (too large), 408 (not all there within
    `timeout_seconds`: a client that declares a body and sends part of it holds nothing long)."""
    if request.content_type != "application/json":
        raise UnsupportedMediaType(
            f"Unsupported Content-Type {request.content_type!r}: send the request body as JSON "
            "with 'Content-Type: application/json'."
        )
    length = request.content_length
    if length is not None and length > max_bytes:
        raise too_large(max_bytes)
    try:
        async with asyncio.timeout(timeout_seconds):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large(max_bytes) from None
    except TimeoutError:
        raise RequestTimeout(
            f"The request body did not arrive within {timeout_seconds:g} s.",
            headers={"Connection": "close"},
        ) from None


def too_large(max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The request body is larger than this server accepts ({max_bytes} bytes)."
    )


@dataclass(frozen=True, slots=True)
class JSONLimits:
    """The shape a request body may have (the `server.max_*` settings)."""

    max_messages: int = 2048
    max_prompts: int = 1024
    max_depth: int = 64
    max_values: int = 65536
    thread_bytes: int = 64 * 1024

    @classmethod
    def of(cls, server: ServerConfig) -> JSONLimits:
        return cls(
            max_messages=server.max_messages,
            max_prompts=server.max_prompts,
            max_depth=server.max_json_depth,
            max_values=server.max_json_values,
            thread_bytes=int(server.json_thread_bytes),
        )


async def parse_json_body(raw: bytes, limits: JSONLimits) -> dict[str, Any]:
    """The body as a JSON object within `limits`, else a 400 that says why. A body above
    `limits.thread_bytes` is parsed on the parser thread (one for the process)."""
    if len(raw) > limits.thread_bytes:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_parser_thread(), parse_json_object, raw, limits)
    return parse_json_object(raw, limits)


def parse_json_object(raw: bytes, limits: JSONLimits) -> dict[str, Any]:
    limit = limits.max_values
    # a body holds fewer values than bytes: only a larger one may be refused before parsing
    if len(raw) > limit and values_at_least(raw, limit) > limit:
        raise too_many_values(limit)
    try:
        body = from_json(raw)  # pydantic-core's parser: faster than json.loads
    except ValueError as exc:
        if "recursion limit exceeded" in str(exc):  # its own cap (201 levels) is above ours
            raise too_deep(limits.max_depth) from None
        raise InvalidRequest(
            f"We could not parse the JSON body of your request: {exc}.", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    check_shape(body, limits)
    return body


def check_shape(body: dict[str, Any], limits: JSONLimits) -> None:
    """Refuse a body over `limits`. The named lists first (their 400 says which limit to mind),
    then depth and the count of values, walking containers only and stopping as soon as the
    count is over: the cost is bounded by `limits.max_values`, whatever the body holds."""
    for name in ("messages", "input"):
        items = body.get(name)
        if isinstance(items, list) and len(items) > limits.max_messages:
            raise too_long(name, len(items), limits.max_messages, "server.max_messages")
    prompt = body.get("prompt")
    # a list of token ids is one prompt (vLLM too tells them apart by the first item)
    if (
        isinstance(prompt, list)
        and len(prompt) > limits.max_prompts
        and not isinstance(prompt[0], int)
    ):
        raise too_long("prompt", len(prompt), limits.max_prompts, "server.max_prompts")
    budget = limits.max_values
    stack: list[tuple[dict[str, Any] | list[Any], int]] = [(body, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limits.max_depth:
            raise too_deep(limits.max_depth)
        budget -= len(node)
        if budget < 0:
            raise too_many_values(limits.max_values)
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))


_MARKS = b'",[{'
_NOT_MARKS = bytes(byte for byte in range(256) if byte not in _MARKS)


def values_at_least(raw: bytes, limit: int) -> int:
    """A lower bound on the values (as `check_shape` counts them) in the JSON text `raw`, found
    with a few passes of C-speed bytes operations (2-25 ms for 4 MiB, where parsing takes up to
    130 ms): a body of a million values is refused without being parsed. The count may stop
    early once it is over `limit`.

    Outside strings, each comma separates two values and each `[` or `{` opens one (all but the
    body's own): values >= max(commas, brackets - 1) there. Escaped backslashes and quotes are
    dropped first, so every quote left delimits a string; then all but quotes, commas and
    brackets, then every two adjacent quotes (an empty stretch, inside or outside a string:
    what is outside stays outside). Text that is not JSON gives a meaningless number, which
    refuses only what its parse would refuse anyway.
    """
    if b"\\" in raw:
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    marks = raw.translate(None, _NOT_MARKS).replace(b'""', b"")
    quotes = marks.count(b'"')
    if quotes:
        if quotes // 4 > limit:  # each string is a value or an object's key
            return quotes // 4
        marks = b"".join(marks.split(b'"')[::2])  # what lies outside strings
    commas = marks.count(b",")
    return max(commas, len(marks) - commas - 1)


def too_many_values(limit: int) -> InvalidRequest:
    return InvalidRequest(
        f"The request body holds more than {limit} JSON values (array items and object "
        "members, counted at every level; server.max_json_values).",
        code="request_too_complex",
    )


def too_long(name: str, length: int, limit: int, setting: str) -> InvalidRequest:
    # OpenAI's wording and code for an over-long array
    return InvalidRequest(
        f"Invalid '{name}': array too long. Expected an array with maximum length {limit} "
        f"({setting}), but got an array with length {length} instead.",
        param=name,
        code="array_above_max_length",
    )


def too_deep(limit: int) -> InvalidRequest:
    return InvalidRequest(
        f"The request body nests arrays and objects more than {limit} levels deep "
        "(server.max_json_depth).",
        code="request_too_complex",
    )


_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _parser_thread() -> ThreadPoolExecutor:
    """One thread for the process: parsing holds the GIL, so more threads would not parse more
    at once, only take the event loop's turns more often."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmserve-json")
        return _executor
