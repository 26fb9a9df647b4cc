"""What the gateway needs from the admission queue and from one place in it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from llmserve.config import Config


class AdmissionTicket(Protocol):
    """One request's place in the queue, then its engine slot."""

    @property
    def position(self) -> int:
        """Requests ahead of this one (0 once admitted)."""

    @property
    def eta_seconds(self) -> float | None:
        """Predicted wait, once the queue has seen completions (None before)."""

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait for the slot; raise the queue's 503/504 when it cannot be had."""

    def first_token(self) -> None:
        """The engine produced the first token (the queue learns prefill speed from it)."""

    def first_token_unseen(self) -> None:
        """The first token will not be seen: the prefill counts as over once predicted so."""

    def release(self) -> None:
        """Give the slot (or the place) back; idempotent."""


class Admission(Protocol):
    def enqueue(
        self,
        priority: int = 0,
        tokens: int = 0,
        deadline: float | None = None,
        *,
        prompt_tokens: int = 0,
        ttft_slo: float | None = None,
    ) -> AdmissionTicket:
        """Join the queue, or raise 503 at once: full, too much queued work, or a predicted
        time to first token beyond `ttft_slo` (or the deadline)."""

    def refuse_early(
        self,
        priority: int,
        prompt_tokens: int,
        deadline: float | None = None,
        ttft_slo: float | None = None,
    ) -> None:
        """Raise the 503 `enqueue` would, before anything is charged for the request."""

    def close(self) -> None:
        """Shutting down: refuse newcomers, send the waiting away with 503 shutting_down."""

    def reconfigure(self, config: Config) -> None:
        """New queue settings for a running server (slots, depth, waits, reserves)."""

    def engine_started(self, config: Config, *, whole_prompt_steps: bool) -> None:
        """The engine runs: settle what depends on it (`queue.lower_prefills: auto`)."""
