"""llmserve: a production LLM API server around an embedded vLLM engine."""

__version__ = "0.1.0"
