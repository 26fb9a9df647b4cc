"""Engine statistics from vLLM's stat-logger hook, kept for `VLLMEngine.stats()`.

vLLM calls a stat logger once per engine step while there is work (on the event-loop thread) and
once more when the queue drains, so the last snapshot is current. With data parallelism each
engine (rank) reports its own steps, with its `engine_idx`: the sink keeps one snapshot per
rank, and the headline is the fullest KV cache and the sums of requests. `StatsSink` is plain
Python; `stat_logger_factory` builds the vLLM-side class lazily, so importing this module needs
no vllm.
"""

from __future__ import annotations

from typing import Any

from llmserve.engine.base import EngineStats, RankStats


class StatsSink:
    """The latest scheduler snapshot of each rank plus running token totals."""

    def __init__(self, ranks: int = 1) -> None:
        self.ranks: dict[int, RankStats] = {r: RankStats(r, 0.0, 0, 0) for r in range(ranks)}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    def record(
        self, scheduler_stats: Any | None, iteration_stats: Any | None, engine_idx: int = 0
    ) -> None:
        if scheduler_stats is not None:
            self.ranks[engine_idx] = RankStats(
                engine_idx,
                float(scheduler_stats.kv_cache_usage),
                int(scheduler_stats.num_running_reqs),
                int(scheduler_stats.num_waiting_reqs),
            )
        if iteration_stats is not None:
            self.prompt_tokens_total += int(iteration_stats.num_prompt_tokens)
            self.generation_tokens_total += int(iteration_stats.num_generation_tokens)

    def snapshot(self) -> EngineStats:
        ranks = tuple(self.ranks[r] for r in sorted(self.ranks))
        return EngineStats(
            kv_cache_usage=max((r.kv_cache_usage for r in ranks), default=0.0),
            running=sum(r.running for r in ranks),
            waiting=sum(r.waiting for r in ranks),
            extra=self._totals(),
            ranks=ranks,
        )

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
            # vLLM passes the reporting engine's index (data parallel); a logger made for one
            # engine knows its own too
            sink.record(scheduler_stats, iteration_stats, engine_idx or self.engine_index)

        def log_engine_initialized(self) -> None:
            pass

    return SinkStatLogger
