"""Engine statistics from vLLM's stat-logger hook, kept for `VLLMEngine.stats()`.

vLLM calls a stat logger once per engine step while there is work (on the event-loop thread) and
once more when the queue drains, so the last snapshot is current. `StatsSink` is plain Python;
`stat_logger_factory` builds the vLLM-side class lazily, so importing this module needs no vllm.
"""

from __future__ import annotations

from typing import Any

from llmserve.engine.base import EngineStats


class StatsSink:
    """The latest scheduler snapshot plus running token totals."""

    def __init__(self) -> None:
        self.latest = EngineStats()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    def record(self, scheduler_stats: Any | None, iteration_stats: Any | None) -> None:
        if scheduler_stats is not None:
            self.latest = EngineStats(
                kv_cache_usage=float(scheduler_stats.kv_cache_usage),
                running=int(scheduler_stats.num_running_reqs),
                waiting=int(scheduler_stats.num_waiting_reqs),
                extra=self._totals(),
            )
        if iteration_stats is not None:
            self.prompt_tokens_total += int(iteration_stats.num_prompt_tokens)
            self.generation_tokens_total += int(iteration_stats.num_generation_tokens)

    def snapshot(self) -> EngineStats:
        latest = self.latest
        return EngineStats(latest.kv_cache_usage, latest.running, latest.waiting, self._totals())

    def _totals(self) -> dict[str, Any]:
        return {
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
        }


def stat_logger_factory(sink: StatsSink) -> Any:
    """A per-engine StatLoggerFactory (callable(vllm_config, engine_index)) feeding `sink`."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SinkStatLogger(StatLoggerBase):  # type: ignore[misc]  # vLLM's types are not followed
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            sink.record(scheduler_stats, iteration_stats)

        def log_engine_initialized(self) -> None:
            pass

    return SinkStatLogger
