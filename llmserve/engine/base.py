"""The Engine seam: everything above it talks to a model only through `Engine`.

Two implementations: `engine.vllm.VLLMEngine` (the embedded vLLM AsyncLLM, the only module that
imports vllm) and `engine.fake.FakeEngine` (deterministic, for tests and gateway benchmarks).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

FinishReason = str  # "stop" | "length" (OpenAI's names); an aborted request simply ends


@dataclass(frozen=True, slots=True)
class Prompt:
    """A prompt ready for the engine: rendered text and/or token ids, counted exactly."""

    text: str | None
    token_ids: list[int] | None
    num_tokens: int


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # vLLM extension
    top_k: int | None = None  # vLLM extension
    priority: int = 0  # higher is more urgent; engines without priority scheduling ignore it
    ignore_eos: bool = False  # generate exactly max_tokens (vLLM extension; benchmarks, tests)
    adapter: str | None = None  # a LoRA adapter of engine.lora.adapters (None: the base model)


@dataclass(frozen=True, slots=True)
class Delta:
    """One step of output: new text, how many tokens it holds, and the end when it is the end."""

    text: str
    num_tokens: int
    finish_reason: FinishReason | None = None


@dataclass(frozen=True, slots=True)
class LoadedAdapter:
    """A LoRA adapter the engine has loaded, served once `Engine.serve_adapter` is called."""

    name: str
    path: str
    handle: Any = None  # the engine's own object for it (vLLM's LoRARequest)


@dataclass(frozen=True, slots=True)
class EngineStats:
    """The engine's scheduler state. With several engines (data parallel), the headline is
    the fullest KV cache and the sums of requests; `ranks` has each engine's own."""

    kv_cache_usage: float = 0.0  # 0..1
    running: int = 0
    waiting: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    ranks: tuple[RankStats, ...] = ()  # per engine (data-parallel rank), in rank order


@dataclass(frozen=True, slots=True)
class RankStats:
    rank: int
    kv_cache_usage: float
    running: int
    waiting: int


class EngineError(Exception):
    """Generation failed inside the engine (the request cannot finish)."""


class EngineUnavailable(EngineError):
    """The engine is not (or no longer) able to serve: not started, dead, or shut down."""


class PromptTooLong(EngineError):
    def __init__(self, num_tokens: int, max_model_len: int, max_tokens: int | None = None) -> None:
        super().__init__(f"prompt has {num_tokens} tokens, context is {max_model_len}")
        self.num_tokens = num_tokens
        self.max_model_len = max_model_len
        self.max_tokens = max_tokens


class GatePass(Protocol):
    """One engine generation admitted by a `GenerationGate`: told what the engine produces, and
    closed exactly once when the generation is over (which settles what it reserved)."""

    @property
    def engine_priority(self) -> int:
        """The priority to hand the engine's scheduler (lower is served first, as in vLLM)."""

    def on_tokens(self, num_tokens: int) -> None:
        """`num_tokens` new output tokens arrived (any choice)."""

    def first_token_unseen(self) -> None:
        """The engine will report nothing before the generation ends (vLLM's non-streaming
        output), so its first token cannot be seen: the admission queue assumes the prefill
        over after its predicted length, and learns nothing from this generation's timing."""

    def on_finish(self, finish_reason: str | None) -> None:
        """A choice ended with this reason ("stop", "length", "tool_calls"...)."""

    def on_rejected(self) -> None:
        """The engine refused the generation before producing anything (its prompt is free)."""

    async def close(self) -> None: ...


class GenerationGate(Protocol):
    """What the gateway applies to every generation an `OpenAIFrontend` starts on behalf of one
    HTTP request: limits and admission before the engine sees it, accounting while it runs."""

    async def enter(
        self, prompt_tokens: int, max_tokens: int, n: int, requested_priority: int
    ) -> GatePass:
        """Reserve `prompt_tokens + n * max_tokens` and wait for an engine slot; raise an
        `APIError` (429, 503, 504...) when the generation may not run."""


@dataclass(frozen=True, slots=True)
class JSONReply:
    """A whole response body (already JSON) with its HTTP status."""

    body: bytes
    status: int = 200


@dataclass(frozen=True, slots=True)
class StreamReply:
    """An SSE response: each item is one complete event (`data: ...\n\n`), the last `[DONE]`."""

    events: AsyncIterator[str]


FrontendRoute = Literal["chat", "completions", "responses", "tokenize", "detokenize"]


class OpenAIFrontend(Protocol):
    """The engine's own OpenAI-compatible request handling (vLLM's serving classes), for requests
    the gateway's fast path does not handle itself: tools, structured outputs, logprobs, n > 1,
    the Responses API, tokenization. Errors are raised as `APIError`s."""

    def request_fields(self, route: FrontendRoute) -> frozenset[str]:
        """The request body fields the engine's request model for `route` accepts."""

    async def handle(
        self, route: FrontendRoute, body: dict[str, Any], gate: GenerationGate
    ) -> JSONReply | StreamReply: ...


@runtime_checkable
class Engine(Protocol):
    """What the gateway needs from a model engine."""

    @property
    def model_name(self) -> str: ...

    @property
    def max_model_len(self) -> int: ...

    async def start(self) -> None:
        """Load the model; after it returns, `check_health` passes."""

    async def render_chat(self, messages: list[dict[str, Any]]) -> Prompt:
        """Apply the model's chat template (with the generation prompt) and count the tokens."""

    async def render_completion(self, prompt: str) -> Prompt:
        """Tokenize a raw completion prompt."""

    def generate(
        self, prompt: Prompt, options: SamplingOptions, request_id: str
    ) -> AsyncGenerator[Delta, None]:
        """Stream deltas; the last one carries finish_reason. Raise EngineError on failure.

        Cancelling the consumer (or closing the iterator) must abort the request in the engine.
        """

    async def abort(self, request_id: str) -> None: ...

    async def check_health(self) -> None:
        """Raise EngineUnavailable if the engine cannot serve."""

    def stats(self) -> EngineStats: ...

    @property
    def frontend(self) -> OpenAIFrontend | None:
        """The engine's own OpenAI request handling once started (None: fast path only)."""

    @property
    def dead(self) -> BaseException | None:
        """The fatal error once the engine has died for good (the process should exit)."""

    @property
    def whole_prompt_steps(self) -> bool:
        """True once started if each prompt's prefill runs whole in one engine step (no
        chunked prefill): prompts that arrive together share a step, however many."""

    async def load_adapter(self, name: str, path: str) -> LoadedAdapter:
        """Load the LoRA adapter at `path` into the engine, not served yet. Raise an `APIError`
        when it cannot be (InvalidRequest: a broken adapter; Conflict: LoRA off, or no room);
        the engine then holds nothing more."""

    def serve_adapter(self, adapter: LoadedAdapter) -> None:
        """Run `adapter` for requests naming it from now on (in place of an adapter of that
        name, whose requests in flight finish on it)."""

    def retire_adapter(self, name: str) -> int:
        """Stop serving the adapter `name`; return how many requests are still running on it.
        They finish on it; then the engine frees it."""

    async def discard_adapter(self, adapter: LoadedAdapter) -> None:
        """Free an adapter that was loaded but never served."""

    async def close(self) -> None: ...
