"""The LoRA adapters of a running vLLM engine: which name runs which loaded adapter, loading and
unloading them at run time, and the requests in flight on each.

    lora = await loras.load("sql", "/srv/adapters/sql")  # in the engine, not served yet
    loras.serve(lora)           # requests for "sql" run it from now on (both request paths)
    with loras.running(lora):   # one generation on it (the fast path and vLLM's handlers)
        ...
    loras.retire("sql")         # new requests: unknown; those in flight finish on it; then the
                                # engine frees it (vLLM's remove_lora)

Each name runs one LoRARequest, the same on llmserve's fast path and in vLLM's handlers: their
registry (OpenAIServingModels.lora_requests) is kept equal to `served`. Ids are never reused.

vLLM's own `/v1/unload_lora_adapter` only forgets the name: the adapter stays loaded in the
engine (its memory and, while active, a LoRA slot) until vLLM's LRU evicts it. Here it leaves
the engine once its last request has finished, so the engine never holds more adapters than
`capacity`: on CPU one more would fill the slot that must stay empty (vllm_lora.cpu_lora_args).
Only this module and vllm.py talk to the engine about adapters; nothing here imports vllm.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any

from llmserve.errors import APIError, Conflict, InvalidRequest, NotFound, ServiceUnavailable

log = logging.getLogger(__name__)

_VLLM_PREFIX = "Call to add_lora method failed: "  # how vLLM's engine core wraps its errors


class LoraSet:
    def __init__(
        self,
        llm: Any,
        make_request: Callable[..., Any],
        base_model: str,
        capacity: int | None,
        engine_dead: Callable[[], bool],
    ) -> None:
        self._llm = llm  # vLLM's AsyncLLM: add_lora, remove_lora
        self._make_request = make_request  # vLLM's LoRARequest
        self._base = base_model
        self.capacity = capacity  # adapters the engine may hold (vllm_lora.adapter_capacity)
        self._engine_dead = engine_dead
        self._served: dict[str, Any] = {}
        self._registry: MutableMapping[str, Any] = {}  # vLLM's handlers' own, mirrored
        self._held: set[int] = set()  # ids in the engine: served, loaded, or draining
        self._in_flight: Counter[int] = Counter()
        self._idle: dict[int, asyncio.Event] = {}  # a retired id's "no request left"
        self._tasks: set[asyncio.Task[None]] = set()
        self._next_id = 1

    def adopt(self, loras: Mapping[str, Any], registry: MutableMapping[str, Any]) -> None:
        """Serve the adapters vLLM loaded at start-up (`--lora-modules`, engine.lora.adapters),
        with `registry` (vLLM's handlers' own) running the very same LoRARequests. vLLM numbered
        its modules itself; a number that differs from ours is logged, then ours wins."""
        self._registry = registry
        for name, ours in loras.items():
            theirs = registry.get(name)
            if theirs is None or (theirs.lora_int_id, theirs.lora_path) != (
                ours.lora_int_id,
                ours.lora_path,
            ):
                log.warning("vLLM registered LoRA adapter %r as %r; using id %s, path %s",
                            name, theirs, ours.lora_int_id, ours.lora_path)  # fmt: skip
            self._served[name] = registry[name] = ours
            self._held.add(ours.lora_int_id)
            self._next_id = max(self._next_id, ours.lora_int_id + 1)

    def get(self, name: str) -> Any | None:
        return self._served.get(name)

    @contextmanager
    def running(self, lora: Any) -> Iterator[None]:
        """One generation on `lora`: counted while it runs, so that the adapter stays in the
        engine until it ends. NotFound when the adapter has left the engine since it was looked
        up (vLLM would quietly load it from its path again, outside of what is counted)."""
        lora_id = lora.lora_int_id
        if lora_id not in self._held:
            raise NotFound(f"The model '{lora.lora_name}' was unloaded.", code="model_not_found",
                           param="model")  # fmt: skip
        self._in_flight[lora_id] += 1
        try:
            yield
        finally:
            self._in_flight[lora_id] -= 1
            if self._in_flight[lora_id] <= 0:
                del self._in_flight[lora_id]
                idle = self._idle.get(lora_id)
                if idle is not None:
                    idle.set()

    async def load(self, name: str, path: str) -> Any:
        """Load an adapter into the engine (vLLM's add_lora), not served until `serve`. Raise
        Conflict when the engine holds as many adapters as it may, InvalidRequest when vLLM
        cannot load it (then the engine holds nothing more)."""
        if self.capacity is not None and len(self._held) >= self.capacity:
            raise Conflict(self._full_message(), code="adapter_limit")
        lora = self._make_request(lora_name=name, lora_int_id=self._next_id, lora_path=path,
                                  base_model_name=self._base)  # fmt: skip
        self._next_id += 1
        self._held.add(lora.lora_int_id)
        try:
            await self._llm.add_lora(lora)
        except Exception as exc:
            # a failure after vLLM registered it (e.g. copying the weights into a slot) leaves
            # it half in: remove it, so that the engine is as it was
            await self._remove(lora.lora_int_id)
            raise self._load_error(exc) from None
        except BaseException:
            self._spawn(self._remove(lora.lora_int_id))
            raise
        return lora

    def serve(self, lora: Any) -> None:
        """Run `lora` for its name from now on; an adapter it replaces is retired."""
        old = self._served.get(lora.lora_name)
        self._served[lora.lora_name] = self._registry[lora.lora_name] = lora
        if old is not None and old is not lora:
            self._retire(old)

    def retire(self, name: str) -> int:
        """Stop serving `name`; return the requests still running on it, which finish on it
        before the engine frees it."""
        lora = self._served.pop(name, None)
        self._registry.pop(name, None)
        return 0 if lora is None else self._retire(lora)

    async def discard(self, lora: Any) -> None:
        """Take a loaded adapter that was never served out of the engine."""
        await self._remove(lora.lora_int_id)

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def _retire(self, lora: Any) -> int:
        self._spawn(self._free_when_idle(lora.lora_int_id))
        return self._in_flight[lora.lora_int_id]

    async def _free_when_idle(self, lora_id: int) -> None:
        try:
            while self._in_flight[lora_id] > 0:
                idle = self._idle[lora_id] = asyncio.Event()
                await idle.wait()
        finally:
            self._idle.pop(lora_id, None)
        await self._remove(lora_id)

    async def _remove(self, lora_id: int) -> None:
        self._held.discard(lora_id)  # first: a request looking it up from now on is refused
        try:
            await self._llm.remove_lora(lora_id)
        except Exception as exc:  # a dead engine frees everything anyway
            log.warning("could not remove LoRA adapter %s from the engine: %s", lora_id, exc)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _full_message(self) -> str:
        draining = len(self._held) - len(self._served)
        note = (f" ({draining} unloaded, waiting for their requests in flight to finish)"
                if draining > 0 else "")  # fmt: skip
        return (f"The engine holds {len(self._held)} LoRA adapters{note}, as many as it may "
                f"(on CPU: engine.lora.max_loras, {self.capacity}). Unload one, or raise "
                "engine.lora.max_loras and restart.")  # fmt: skip

    def _load_error(self, exc: Exception) -> APIError:
        if self._engine_dead():
            return ServiceUnavailable("The model engine is unavailable.", code="engine_unavailable")
        reason = str(exc).removeprefix(_VLLM_PREFIX) or type(exc).__name__
        return InvalidRequest(f"vLLM could not load the adapter: {reason}",
                              code="adapter_invalid", param="path")  # fmt: skip
