"""A deterministic engine for tests and for measuring the gateway without a model.

Output: the words of `WORDS`, in order and cycling, one word (with a trailing space) per token.
Prompt tokens: one per whitespace-separated word of the rendered prompt. A chat is rendered as
one line per message, `<role>: <content>`, followed by `assistant:` (the generation prompt), so
`[{"role": "user", "content": "hi there"}]` is `user: hi there\nassistant:`: 4 tokens.
A stop string that equals a whole output word ends generation before that word.
LoRA adapters (engine.lora.adapters) are names only: the k-th adapter loaded (from 1: those of
the config first, in order, then those loaded at run time) starts its output 5 x k words further
into `WORDS`, so each model name answers differently; a path in `adapter_errors` fails to load.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from llmserve.config import EngineConfig
from llmserve.engine.base import (
    Delta,
    EngineError,
    EngineStats,
    EngineUnavailable,
    LoadedAdapter,
    Prompt,
    RankStats,
    SamplingOptions,
)
from llmserve.errors import Conflict, InvalidRequest

WORDS = (
    "The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "a",
    "patient", "engine", "counts", "every", "token", "it", "sends", "to", "the", "client", ".",
)  # fmt: skip

_YIELD_EVERY = 16  # give the event loop a turn this often when generating at full speed


RECENT_CALLS = 1000  # calls, aborts and finishes remembered


@dataclass(slots=True)
class GenerateCall:
    request_id: str
    prompt: Prompt
    options: SamplingOptions


class FakeEngine:
    def __init__(
        self,
        model_name: str = "fake",
        max_model_len: int = 2048,
        *,
        ttft_seconds: float = 0.0,
        tokens_per_second: float = 0.0,
        output_tokens: int | None = None,
        fail_before_first_token: bool = False,
        fail_after_tokens: int | None = None,
        max_num_seqs: int = 16,
        data_parallel_size: int = 1,
        adapters: tuple[str, ...] = (),
        max_adapters: int | None = None,
    ) -> None:
        self._model_name = model_name
        self._adapter_ids = {name: k for k, name in enumerate(adapters, start=1)}
        self._loaded_ids = len(adapters)
        self.max_adapters = max_adapters  # adapters it may hold (None: any number)
        self.adapter_errors: dict[str, str] = {}  # path -> why loading it fails (scripted)
        self.on_adapter: Counter[int] = Counter()  # requests running, by adapter id
        self._max_model_len = max_model_len
        self.ttft_seconds = ttft_seconds
        self.tokens_per_second = tokens_per_second
        self.output_tokens = output_tokens
        self.fail_before_first_token = fail_before_first_token
        self.fail_after_tokens = fail_after_tokens
        self.max_num_seqs = max_num_seqs  # per engine (rank)
        self.data_parallel_size = data_parallel_size
        # the most recent requests, for tests; bounded so a long benchmark run does not grow the
        # heap (and every garbage-collector pass with it)
        self.calls: deque[GenerateCall] = deque(maxlen=RECENT_CALLS)
        self.aborted: deque[str] = deque(maxlen=RECENT_CALLS)
        self.finished: deque[str] = deque(maxlen=RECENT_CALLS)
        self.running = 0
        self.max_running = 0
        self.generated_tokens = 0
        self.started = False
        self.closed = False
        self._dead: BaseException | None = None

    @classmethod
    def from_config(cls, config: EngineConfig) -> FakeEngine:
        fake = config.fake
        return cls(
            model_name=config.served_model_name or "fake",
            max_model_len=config.max_model_len,
            ttft_seconds=fake.ttft_seconds,
            tokens_per_second=fake.tokens_per_second,
            output_tokens=fake.output_tokens,
            fail_before_first_token=fake.fail_before_first_token,
            fail_after_tokens=fake.fail_after_tokens,
            max_num_seqs=config.max_num_seqs,
            data_parallel_size=config.data_parallel_size,
            adapters=tuple(config.lora.adapters),
        )

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def adapters(self) -> tuple[str, ...]:
        """The adapters served, in the order they were loaded."""
        return tuple(self._adapter_ids)

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def whole_prompt_steps(self) -> bool:
        return False  # no steps: each request is timed on its own

    @property
    def dead(self) -> BaseException | None:
        return self._dead

    def kill(self, error: BaseException | None = None) -> None:
        """Simulate the engine dying for good (tests of engine failure)."""
        self._dead = error or EngineUnavailable("fake engine died")

    async def start(self) -> None:
        self.started = True

    async def render_chat(self, messages: list[dict[str, Any]]) -> Prompt:
        lines = [f"{m['role']}: {_text_of(m.get('content'))}" for m in messages]
        text = "\n".join([*lines, "assistant:"])
        return Prompt(text=text, token_ids=None, num_tokens=len(text.split()))

    async def render_completion(self, prompt: str) -> Prompt:
        return Prompt(text=prompt, token_ids=None, num_tokens=max(1, len(prompt.split())))

    async def generate(
        self, prompt: Prompt, options: SamplingOptions, request_id: str
    ) -> AsyncGenerator[Delta, None]:
        self._check_alive()
        adapter = 0 if options.adapter is None else self._adapter_ids.get(options.adapter)
        if adapter is None:
            raise InvalidRequest(f"This server has no adapter {options.adapter!r}.", param="model")
        self.calls.append(GenerateCall(request_id, prompt, options))
        self.running += 1
        self.on_adapter[adapter] += 1
        self.max_running = max(self.max_running, self.running)
        finished = False
        try:
            async for delta in self._deltas(options, 5 * adapter):
                yield delta
            finished = True
        finally:
            self.running -= 1
            self.on_adapter[adapter] -= 1
            (self.finished if finished else self.aborted).append(request_id)

    async def _deltas(self, options: SamplingOptions, offset: int) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        if self.ttft_seconds:
            await asyncio.sleep(self.ttft_seconds)
        if self.fail_before_first_token:
            raise EngineError("fake engine failure before the first token")
        limit = options.max_tokens
        if self.output_tokens is not None:
            limit = min(limit, self.output_tokens)
        stops = set(options.stop)
        for i in range(limit):
            if self.fail_after_tokens is not None and i >= self.fail_after_tokens:
                raise EngineError(f"fake engine failure after {i} tokens")
            word = WORDS[(i + offset) % len(WORDS)]
            if word in stops:
                yield Delta(text="", num_tokens=0, finish_reason="stop")
                return
            await self._pace(loop, start, i)
            self.generated_tokens += 1
            last = i == limit - 1
            reason = None if not last else ("length" if limit == options.max_tokens else "stop")
            yield Delta(text=word + " ", num_tokens=1, finish_reason=reason)
        if limit == 0:
            yield Delta(text="", num_tokens=0, finish_reason="length")

    async def _pace(self, loop: asyncio.AbstractEventLoop, start: float, index: int) -> None:
        if self.tokens_per_second > 0:
            due = start + self.ttft_seconds + index / self.tokens_per_second
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
                return
        if index % _YIELD_EVERY == _YIELD_EVERY - 1:
            await asyncio.sleep(0)

    async def load_adapter(self, name: str, path: str) -> LoadedAdapter:
        self._check_alive()
        if path in self.adapter_errors:
            raise InvalidRequest(f"Adapter {name!r}: {self.adapter_errors[path]}.",
                                 code="adapter_invalid", param="path")  # fmt: skip
        if self.max_adapters is not None and len(self._adapter_ids) >= self.max_adapters:
            raise Conflict(f"The engine holds {self.max_adapters} adapters, as many as it may.",
                           code="adapter_limit")  # fmt: skip
        self._loaded_ids += 1
        return LoadedAdapter(name, path, self._loaded_ids)

    def serve_adapter(self, adapter: LoadedAdapter) -> None:
        self._adapter_ids.pop(adapter.name, None)
        self._adapter_ids[adapter.name] = adapter.handle

    def retire_adapter(self, name: str) -> int:
        adapter = self._adapter_ids.pop(name, None)
        return 0 if adapter is None else self.on_adapter[adapter]

    async def discard_adapter(self, adapter: LoadedAdapter) -> None:
        return None

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def check_health(self) -> None:
        self._check_alive()
        if not self.started:
            raise EngineUnavailable("engine is starting")

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineUnavailable("engine is not available")
        if self.closed:
            raise EngineUnavailable("engine is shut down")

    @property
    def frontend(self) -> None:
        """The fake engine has no OpenAI frontend of its own: only the fast path."""
        return None

    def stats(self) -> EngineStats:
        """Requests spread over the ranks as evenly as a data-parallel coordinator would."""
        ranks = self.data_parallel_size
        each, extra = divmod(self.running, ranks)
        per_rank = [each + (1 if r < extra else 0) for r in range(ranks)]
        return EngineStats(
            kv_cache_usage=min(1.0, max(per_rank) / self.max_num_seqs),
            running=self.running,
            waiting=0,
            ranks=tuple(
                RankStats(r, min(1.0, n / self.max_num_seqs), n, 0) for r, n in enumerate(per_rank)
            ),
        )

    async def close(self) -> None:
        self.closed = True


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return " ".join(part.get("text", "") for part in content)
