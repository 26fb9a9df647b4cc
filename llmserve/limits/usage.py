"""Reading a principal's usage from the configured store, for `llmserve keys usage`."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from llmserve.config import LimitsConfig
from llmserve.limits.headers import format_duration
from llmserve.limits.limiter import Clock, Limiter
from llmserve.limits.stores import store_from_url
from llmserve.limits.windows import RULE_SHAPES, WindowStatus


async def read_usage(
    config: LimitsConfig,
    principal_id: str,
    tier_name: str | None,
    overrides: Mapping[str, int],
    clock: Clock = time.time,
) -> list[WindowStatus]:
    """Open the store `config` names, read every window of the principal, close it.

    With memory:// this reads what servers sharing the state_dir have flushed (<= 1 s old).
    """
    limiter = Limiter(config, store_from_url(config.store, config.state_dir), clock)
    try:
        return await limiter.usage(principal_id, tier_name, overrides)
    finally:
        await limiter.close()


def usage_record(window: WindowStatus) -> dict[str, Any]:
    """One window as plain data (the `--json` output)."""
    return {
        "window": window.name,
        "model": window.model,  # None: the tier's own window, else that model's
        "label": RULE_SHAPES[window.name][0],
        "limit": window.limit,
        "used": window.used,
        "remaining": window.remaining,
        "reset_seconds": round(window.reset_seconds, 3),
        "reset": format_duration(window.reset_seconds),
    }
