from llmserve.engine.base import (
    Delta,
    Engine,
    EngineError,
    EngineStats,
    EngineUnavailable,
    Prompt,
    PromptTooLong,
    SamplingOptions,
)

__all__ = [
    "Delta",
    "Engine",
    "EngineError",
    "EngineStats",
    "EngineUnavailable",
    "Prompt",
    "PromptTooLong",
    "SamplingOptions",
]
