"""Reading a JSON request body: content type and size are checked before parsing."""

from __future__ import annotations

import asyncio

from aiohttp import web

from llmserve.errors import PayloadTooLarge, RequestTimeout, UnsupportedMediaType


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
