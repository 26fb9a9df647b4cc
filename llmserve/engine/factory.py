"""Build the engine the config names. vllm is imported only when `kind: vllm` is asked for."""

from __future__ import annotations

from llmserve.config import EngineConfig
from llmserve.engine.base import Engine


def create_engine(config: EngineConfig) -> Engine:
    if config.kind == "fake":
        from llmserve.engine.fake import FakeEngine

        return FakeEngine.from_config(config)
    from llmserve.engine.vllm import VLLMEngine  # the only path that imports vllm

    return VLLMEngine(config)
