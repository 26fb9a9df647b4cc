"""`--sweep`: raise the request rate step by step until goodput stops rising or requests fail,
and name the highest rate whose step met the SLO.

Goodput (requests/s within every `--goodput` bound; with no `--goodput` every successful
request counts) "stops rising" when a step gains less than `min_gain` (5%) over the previous
one: past saturation, more offered load only adds queueing. A step meets the SLO when no
request failed, at least `min_good_fraction` of its requests were good, and its goodput still
rose (the first step has nothing to rise from). Offered and served rates are not compared
directly: a finite run's duration includes the last requests' latency, so a short run serves
less than it offered even when the server keeps up.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

DEFAULT_MIN_GAIN = 0.05


@dataclass(frozen=True, slots=True)
class SweepStep:
    rate: float
    completed: int
    failed: int
    request_throughput: float
    request_goodput: float
    result: dict[str, Any]

    @property
    def good_fraction(self) -> float:
        if self.request_throughput <= 0:
            return 0.0
        return self.request_goodput / self.request_throughput


@dataclass(frozen=True, slots=True)
class SweepOutcome:
    steps: list[SweepStep]
    best_rate: float | None
    stop_reason: str

    def summary(self) -> dict[str, Any]:
        return {
            "best_rate": self.best_rate,
            "stop_reason": self.stop_reason,
            "steps": [
                {
                    "request_rate": s.rate,
                    "completed": s.completed,
                    "failed": s.failed,
                    "request_throughput": s.request_throughput,
                    "request_goodput": s.request_goodput,
                }
                for s in self.steps
            ],
        }


def step_from_result(rate: float, result: dict[str, Any]) -> SweepStep:
    throughput = float(result["request_throughput"])
    goodput = result.get("request_goodput")
    return SweepStep(
        rate=rate,
        completed=int(result["completed"]),
        failed=int(result["failed"]),
        request_throughput=throughput,
        request_goodput=throughput if goodput is None else float(goodput),
        result=result,
    )


def rose(steps: list[SweepStep], index: int, min_gain: float = DEFAULT_MIN_GAIN) -> bool:
    """Did goodput at step `index` rise enough over the step before (the first always did)?"""
    if index == 0:
        return steps[0].request_goodput > 0
    return steps[index].request_goodput >= steps[index - 1].request_goodput * (1 + min_gain)


def stop_reason(steps: list[SweepStep], min_gain: float = DEFAULT_MIN_GAIN) -> str | None:
    """Why the sweep ends after these steps, or None to go on."""
    last = steps[-1]
    if last.failed:
        return f"{last.failed} requests failed at {last.rate:g} req/s"
    if len(steps) >= 2 and not rose(steps, len(steps) - 1, min_gain):
        return f"goodput stopped rising at {last.rate:g} req/s"
    return None


def best_rate(
    steps: list[SweepStep], min_good_fraction: float, min_gain: float = DEFAULT_MIN_GAIN
) -> float | None:
    passing = [
        s.rate
        for i, s in enumerate(steps)
        if s.failed == 0 and s.good_fraction >= min_good_fraction and rose(steps, i, min_gain)
    ]
    return max(passing) if passing else None


async def sweep(
    run_step: Callable[[float], Awaitable[SweepStep | None]],
    *,
    start_rate: float,
    factor: float,
    max_steps: int,
    min_good_fraction: float,
    min_gain: float = DEFAULT_MIN_GAIN,
) -> SweepOutcome:
    """`run_step(rate)` runs one load at that rate; None means the user stopped the sweep."""
    steps: list[SweepStep] = []
    rate, reason = start_rate, f"reached --sweep-steps ({max_steps})"
    for _ in range(max_steps):
        step = await run_step(rate)
        if step is None:
            reason = "interrupted"
            break
        steps.append(step)
        if (why := stop_reason(steps, min_gain)) is not None:
            reason = why
            break
        rate *= factor
    return SweepOutcome(steps, best_rate(steps, min_good_fraction, min_gain), reason)
