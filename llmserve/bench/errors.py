"""Errors of the load generator (the CLI prints them and exits 2)."""

from __future__ import annotations

from llmserve.errors import LLMServeError


class BenchError(LLMServeError):
    """A bench option, dataset or tokenizer is unusable; the message says which and why."""
