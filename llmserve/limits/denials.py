"""The 429s: which window refused a request, in words the caller can act on."""

from __future__ import annotations

import math
from collections.abc import Sequence

from llmserve.errors import RateLimited, retry_after_header
from llmserve.limits.headers import format_duration, rate_limit_headers
from llmserve.limits.windows import RULE_SHAPES, WindowCharge, retry_after, status


def never_fits(charge: WindowCharge) -> RateLimited:
    """The request is bigger than the window itself: retrying cannot help, so no Retry-After."""
    label, unit, _, _ = RULE_SHAPES[charge.name]
    error = RateLimited(
        f"This request needs {charge.cost} {unit} but your {label} limit is {charge.limit}, "
        "so it can never be admitted. Lower max_tokens or shorten the prompt.",
        # the OpenAI SDKs retry a 429 unless told not to: a retry cannot help here
        headers={"x-should-retry": "false", f"x-ratelimit-limit-{unit}": str(charge.limit)},
    )
    error.limit = charge.name
    return error


def limit_reached(
    charges: Sequence[WindowCharge], used: Sequence[float], now: float
) -> RateLimited:
    """Name the window the caller waits longest for: the request fits once that one admits it."""
    waits = [
        (wait, charge, u)
        for charge, u in zip(charges, used, strict=True)
        if (wait := retry_after(charge, u, now))  # None never happens here; 0 means it fits
    ]
    wait, charge, u = max(waits, key=lambda item: item[0])
    label = RULE_SHAPES[charge.name][0]
    message = (
        f"Rate limit reached on {label}: limit {charge.limit}, used {math.ceil(u - 1e-9)}, "
        f"requested {charge.cost}. Please try again in {format_duration(wait)}."
    )
    statuses = [status(c, u, now) for c, u in zip(charges, used, strict=True)]
    headers = rate_limit_headers(statuses, refused_by=charge.name)
    headers.update(retry_after_header(wait))
    error = RateLimited(message, headers=headers)
    error.limit = charge.name
    return error
