"""Small helpers for API tests."""

from __future__ import annotations

from typing import Any


def chat_body(content: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {"model": "fake", "messages": [{"role": "user", "content": content}], **extra}


def parse_sse(raw: bytes) -> list[bytes]:
    """Split an SSE body into its events (each without the trailing blank line)."""
    assert raw.endswith(b"\n\n"), raw[-80:]
    return raw[:-2].split(b"\n\n")
