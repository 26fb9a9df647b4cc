"""When each request is sent: the arrival process of `vllm bench serve`.

Inter-arrival gaps follow a gamma distribution with shape `burstiness` and mean `1/rate`:
burstiness 1 is a Poisson process, below 1 burstier, above 1 more regular, infinite a fixed
gap. As in vLLM, the cumulative offsets are rescaled so the last request is sent at exactly
`num/rate` seconds, which keeps throughput figures stable across seeds.
"""

from __future__ import annotations

import math
import random

from llmserve.bench.errors import BenchError


def arrival_offsets(
    num: int, rate: float, burstiness: float = 1.0, rng: random.Random | None = None
) -> list[float]:
    """Seconds from the start of the run at which each of `num` requests is sent."""
    if rate <= 0 or burstiness <= 0:
        raise BenchError("--request-rate and --burstiness must be positive")
    if num == 0:
        return []
    if math.isinf(rate):
        return [0.0] * num
    gaps = _gaps(num, rate, burstiness, rng or random.Random(0))
    offsets, total = [], 0.0
    for gap in gaps:
        total += gap
        offsets.append(total)
    if total == 0:
        return offsets
    scale = (num / rate) / total
    return [offset * scale for offset in offsets]


def _gaps(num: int, rate: float, burstiness: float, rng: random.Random) -> list[float]:
    if math.isinf(burstiness):
        return [1.0 / rate] * num
    theta = 1.0 / (rate * burstiness)
    return [rng.gammavariate(burstiness, theta) for _ in range(num)]
