"""The 429s: which window refused a request, in words the caller can act on."""

from __future__ import annotations

import math
from collections.abc import Sequence

from llmserve.errors import RateLimited, retry_after_header
from llmserve.limits.headers import (
    MODEL_PREFIX,
    OVERALL_PREFIX,
    format_duration,
    rate_limit_headers,
)
from llmserve.limits.windows import RULE_SHAPES, WindowCharge, fits, retry_after, status

# When requests in flight hold enough of a day or month window that their settlement could
# admit a refused request, its Retry-After says this instead of the window's end: holds are
# worst cases, and most give tokens back within seconds when their requests finish.
SETTLEMENT_RETRY_SECONDS = 1.0


def never_fits(charge: WindowCharge) -> RateLimited:
    """The request is bigger than the window itself: retrying cannot help, so no Retry-After."""
    label, unit, _, _ = RULE_SHAPES[charge.name]
    prefix, scope = (OVERALL_PREFIX, "") if charge.model is None else (
        MODEL_PREFIX, f" for model {charge.model}")  # fmt: skip
    error = RateLimited(
        f"This request needs {charge.cost} {unit} but your {label} limit{scope} is "
        f"{charge.limit}, so it can never be admitted. Lower max_tokens or shorten the prompt.",
        # the OpenAI SDKs retry a 429 unless told not to: a retry cannot help here
        headers={"x-should-retry": "false", f"{prefix}-limit-{unit}": str(charge.limit)},
    )
    _name_window(error, charge)
    return error


def window_label(charge: WindowCharge) -> str:
    """How a message names a window: "tokens per minute", or with its model,
    "tokens per minute for model smollm2-lora-a"."""
    label = RULE_SHAPES[charge.name][0]
    return label if charge.model is None else f"{label} for model {charge.model}"


def _name_window(error: RateLimited, charge: WindowCharge) -> None:
    error.limit = charge.name
    error.limit_model = charge.model


def limit_reached(
    charges: Sequence[WindowCharge],
    used: Sequence[float],
    now: float,
    held: Sequence[float] = (),
) -> RateLimited:
    """Name the window the caller waits longest for: the request fits once that one admits it.

    `held`: per window, the part of `used` that requests in flight hold; a window that would
    admit the request were they settled says SETTLEMENT_RETRY_SECONDS, not its end."""
    held = tuple(held) or (0.0,) * len(charges)
    waits = [
        (_wait(charge, u, h, now), charge, u, h)
        for charge, u, h in zip(charges, used, held, strict=True)
        if retry_after(charge, u, now)  # None never happens here; 0 means it fits
    ]
    wait, charge, u, h = max(waits, key=lambda item: item[0])
    label = window_label(charge)
    message = (
        f"Rate limit reached on {label}: limit {charge.limit}, used {math.ceil(u - 1e-9)}, "
        f"requested {charge.cost}. Please try again in {format_duration(wait)}."
    )
    if wait == SETTLEMENT_RETRY_SECONDS and h > 0:
        message += (
            f" {math.ceil(h - 1e-9)} of the {label} used are held by requests still in "
            "flight and come back in part when they finish."
        )
    statuses = [status(c, u, now) for c, u in zip(charges, used, strict=True)]
    headers = rate_limit_headers(statuses, refused_by=charge.name, refused_model=charge.model)
    headers.update(retry_after_header(wait))
    error = RateLimited(message, headers=headers)
    _name_window(error, charge)
    return error


def _wait(charge: WindowCharge, used: float, held: float, now: float) -> float:
    wait = retry_after(charge, used, now) or 0.0
    if held > 0 and fits(used - held, charge.cost, charge.limit):
        return min(wait, SETTLEMENT_RETRY_SECONDS)
    return wait
