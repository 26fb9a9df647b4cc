"""`--sweep`: raise the request rate step by step until goodput stops rising or requests fail,
and name the highest rate whose step met the SLO.

A step meets the SLO when no request failed and its goodput (requests/s within every `--goodput`
bound; with no `--goodput` every successful request counts) is at least `min_good_fraction` of
the offered rate: the server kept up with the load and kept its latencies. Goodput "stops
rising" when a step gains less than `min_gain` (5%) over the previous one: past saturation,
more offered load only adds queueing.
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

    def met_slo(self, min_good_fraction: float) -> bool:
        kept_up = self.request_goodput >= min_good_fraction * self.rate
        return self.completed > 0 and self.failed == 0 and kept_up


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


def stop_reason(steps: list[SweepStep], min_gain: float = DEFAULT_MIN_GAIN) -> str | None:
    """Why the sweep ends after these steps, or None to go on."""
    last = steps[-1]
    if last.failed:
        return f"{last.failed} requests failed at {last.rate:g} req/s"
    if len(steps) >= 2 and last.request_goodput < steps[-2].request_goodput * (1 + min_gain):
        return f"goodput stopped rising at {last.rate:g} req/s"
    return None


def best_rate(steps: list[SweepStep], min_good_fraction: float) -> float | None:
    passing = [s.rate for s in steps if s.met_slo(min_good_fraction)]
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
    return SweepOutcome(steps, best_rate(steps, min_good_fraction), reason)
