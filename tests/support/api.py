"""Small helpers for API tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmserve.config import Config


def chat_body(content: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {"model": "fake", "messages": [{"role": "user", "content": content}], **extra}


def parse_sse(raw: bytes) -> list[bytes]:
    """Split an SSE body into its events (each without the trailing blank line)."""
    assert raw.endswith(b"\n\n"), raw[-80:]
    return raw[:-2].split(b"\n\n")


def make_config(tmp_path: Path, **sections: Any) -> Config:
    """A Config whose state lives under tmp_path; `sections` override whole sections' fields."""
    data: dict[str, Any] = {
        "engine": {"kind": "fake", "served_model_name": "fake", "max_model_len": 256},
        "auth": {"enabled": False, "keys": str(tmp_path / "keys")},
        "limits": {"state_dir": str(tmp_path / "limits")},
        "usage": {"ledger": str(tmp_path / "usage.jsonl")},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return Config.model_validate(data)
