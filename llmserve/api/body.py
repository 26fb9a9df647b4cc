"""Reading a JSON request body: content type and size are checked before parsing."""

from __future__ import annotations

from aiohttp import web

from llmserve.errors import PayloadTooLarge, UnsupportedMediaType


async def read_json_body(request: web.Request, max_bytes: int) -> bytes:
    if request.content_type != "application/json":
        raise UnsupportedMediaType(
            f"Unsupported Content-Type {request.content_type!r}: send the request body as JSON "
            "with 'Content-Type: application/json'."
        )
    length = request.content_length
    if length is not None and length > max_bytes:
        raise too_large(max_bytes)
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large(max_bytes) from None


def too_large(max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The request body is larger than this server accepts ({max_bytes} bytes)."
    )
