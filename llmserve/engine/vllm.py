"""The embedded vLLM engine (AsyncLLM) behind the Engine seam.

This is the only module that imports vllm, and only inside `start()` (in a worker thread, so the
event loop keeps answering /health while the model loads). What was measured about vLLM on CPU
and why the CPU settings are what they are: docs/engine.md ("CPU notes") and `vllm_args.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from llmserve.config import EngineConfig
from llmserve.engine import vllm_lora
from llmserve.engine.base import (
    Delta,
    EngineError,
    EngineStats,
    EngineUnavailable,
    LoadedAdapter,
    Prompt,
    PromptTooLong,
    SamplingOptions,
)
from llmserve.engine.node_heartbeat import HeartbeatListener
from llmserve.engine.reaper import Reaper
from llmserve.engine.vllm_adapters import LoraSet
from llmserve.engine.vllm_args import (
    BASE_ENV,
    EngineLaunch,
    build_launch,
    check_options,
    cpu_dtype,
    frontend_args,
    is_multi_node,
    read_cpu_flags,
    read_mem_available,
    resolve_device,
)
from llmserve.engine.vllm_frontend import VLLMFrontend, build_frontend
from llmserve.engine.vllm_render import content_length, encode, render_chat_text
from llmserve.engine.vllm_stats import StatsSink, stat_logger_factory
from llmserve.errors import Conflict, EngineStartError, InvalidRequest

log = logging.getLogger(__name__)

_BACKGROUND: set[asyncio.Task[None]] = set()  # fire-and-forget tasks, kept until they end

# Conversations longer than this are rendered in a worker thread, so one big prompt does not
# stall every stream; short ones are cheaper to render inline (~0.1 ms) than to hand off.
_OFFLOAD_RENDER_CHARS = 16_384
# Model generation-config defaults applied to fields a request leaves unset, as `vllm serve`
# does; other keys of the generation config (e.g. max_new_tokens) are not sampling defaults.
_DEFAULTABLE = frozenset(
    {
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
    }
)


class VLLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self._config = config
        self._llm: Any = None
        self._built: Any = None  # handed from the start-up thread to start()
        self._vllm: Any = None  # the vllm names we use, bound at start()
        self._tokenizer: Any = None
        self._launch: EngineLaunch | None = None
        self._sampling_defaults: dict[str, Any] = {}
        self._sink = StatsSink(ranks=config.data_parallel_size)
        self._frontend: VLLMFrontend | None = None
        self._dead: BaseException | None = None
        self._closed = False
        self._lock = threading.Lock()  # orders close() against a start-up thread
        self._reaper: Reaper | None = None  # kills the engine's processes if the server dies
        self._aborting: set[str] = set()  # requests abort() ended: no finish is expected
        self._loras: LoraSet | None = None  # the adapters served (vllm_adapters.py)
        self._in_flight: set[str] = set()  # requests generating now
        self._heartbeats: HeartbeatListener | None = None  # worker nodes (node_heartbeat.py)
        self._start_thread: threading.Thread | None = None  # builds vLLM's engine (_build)
        self.start_seconds: float | None = None

    @property
    def model_name(self) -> str:
        return self._config.model_name

    @property
    def max_model_len(self) -> int:
        return self._config.max_model_len

    @property
    def launch(self) -> EngineLaunch | None:
        """How the engine was started (device, AsyncEngineArgs, environment); None before."""
        return self._launch

    @property
    def whole_prompt_steps(self) -> bool:
        """On CPU llmserve turns chunked prefill off (a seeded, chunked prefill crashes it)."""
        launch = self._launch
        return launch is not None and launch.engine_args.get("enable_chunked_prefill") is False

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._closed:
            raise EngineUnavailable("engine is shut down")
        if self._llm is not None:
            return
        began = time.monotonic()
        if self._reaper is None:
            self._reaper = Reaper.start()  # before the engine's processes exist
        try:
            await self._watch_nodes()
            await self._start()
        except BaseException:
            self._stop_reaper()
            await self._stop_watching_nodes()
            raise
        self.start_seconds = time.monotonic() - began
        log.info(
            "vLLM engine ready: model %s on %s (dtype %s) in %.1f s",
            self.model_name,
            self._launch.device if self._launch else "?",
            self._launch.engine_args.get("dtype") if self._launch else "?",
            self.start_seconds,
        )

    async def _start(self) -> None:
        # The result comes back through an attribute, not the thread's future: an idle worker
        # thread keeps its last future alive, and with it the engine after close().
        self._start_thread, done = _in_daemon_thread(self._build)
        await done
        llm, self._built = self._built, None
        self._tokenizer = llm.get_tokenizer()
        self._sampling_defaults = _sampling_defaults(llm)
        try:
            loras = self._lora_set(llm)
            self._frontend = await build_frontend(
                llm, frontend_args(self._config, _frontend_arg_names()), loras
            )
            loras.adopt(_lora_requests(self._vllm.LoRARequest, self._config),
                        self._frontend.lora_registry)  # fmt: skip
            self._loras = loras
        except Exception as exc:
            _shutdown(llm)
            raise EngineStartError(f"vLLM's request handlers could not start: {exc}") from exc
        self._llm = llm  # last: check_health passes only once everything above is set

    def _build(self) -> None:
        _check_model_exists(self._config.model)
        vllm_lora.check_adapters(self._config)
        for name, value in BASE_ENV.items():
            os.environ.setdefault(name, value)
        device = resolve_device(self._config, _cuda_available())
        flags, memory = read_cpu_flags(), read_mem_available()
        launch = build_launch(self._config, device, _engine_arg_names(), flags, memory)
        if device == "cpu":
            choice = cpu_dtype(self._config, flags, memory)
            log.log(logging.WARNING if choice.slow else logging.INFO,
                    "engine dtype on CPU: %s", choice.reason)  # fmt: skip
            log.info("engine KV cache on CPU: %d MiB",
                     launch.engine_args["kv_cache_memory_bytes"] // 2**20)  # fmt: skip
        os.environ.update(launch.env)
        self._vllm = _import_vllm()
        self._launch = launch
        try:
            args = self._vllm.AsyncEngineArgs(**_engine_arg_objects(launch.engine_args))
            llm = self._vllm.AsyncLLM.from_engine_args(
                args, stat_loggers=[stat_logger_factory(self._sink)]
            )
        except Exception as exc:
            log.exception("vLLM failed to start")
            raise EngineStartError(
                f"vLLM could not start model {self._config.model!r}: {exc}"
            ) from exc
        with self._lock:
            if not self._closed:
                # Drop the local: a traceback vLLM keeps from start-up pins this frame.
                self._built, llm = llm, None
                return
        # close() came while loading (e.g. SIGTERM during start-up): leave nothing running.
        _shutdown(llm)
        raise EngineUnavailable("engine was shut down during start-up")

    async def close(self) -> None:
        if self._closed:
            return
        with self._lock:
            self._closed = True
        llm, self._llm = self._llm, None
        await self._stop_watching_nodes()
        if self._loras is not None:
            self._loras.close()
        if llm is not None:
            _shutdown(llm)
        await self._wait_for_start_thread()
        self._stop_reaper()

    async def _wait_for_start_thread(self) -> None:
        """A start-up cut short goes on in its thread until vLLM returns, then shuts the engine
        down (_build). On one node that takes as long as loading the model: wait for it, so that
        nothing of the engine outlives close(). Across nodes vLLM may wait up to 600 s for the
        other nodes' engines: leave the thread (a daemon) and let the reaper end the processes."""
        thread = self._start_thread
        if thread is None or is_multi_node(self._config):
            return
        while thread.is_alive():
            await asyncio.sleep(0.05)

    def _stop_reaper(self) -> None:
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            reaper.stop()

    # -- health -------------------------------------------------------------------------------

    async def _watch_nodes(self) -> None:
        """On an engine that spans nodes, listen for the workers' heartbeats: a worker node
        that stops makes this engine dead (node_heartbeat.py)."""
        if not is_multi_node(self._config) or self._heartbeats is not None:
            return
        nodes = self._config.nodes
        host = nodes.data_parallel_address or nodes.master_addr or "0.0.0.0"
        listener = HeartbeatListener(self._node_lost)
        try:
            await listener.start(host, nodes.heartbeat_port)
        except OSError as exc:
            raise EngineStartError(
                f"engine.nodes.heartbeat_port: cannot listen on {host}:{nodes.heartbeat_port} "
                f"for the worker nodes' heartbeats: {exc}"
            ) from exc
        self._heartbeats = listener

    async def _stop_watching_nodes(self) -> None:
        listener, self._heartbeats = self._heartbeats, None
        if listener is not None:
            await listener.close()

    def _node_lost(self, node: str, why: str) -> None:
        """A worker node went away: its ranks answer nothing more, so the engine is dead, and
        the requests in flight end now (with 503 or an error event) instead of hanging."""
        if self._closed:
            return
        self._mark_dead(EngineUnavailable(f"worker {node} {why}"))
        llm = self._llm
        if llm is not None and self._in_flight:
            ids = list(self._in_flight)
            task = asyncio.get_running_loop().create_task(llm.abort(ids))
            _BACKGROUND.add(task)
            task.add_done_callback(_BACKGROUND.discard)

    @property
    def dead(self) -> BaseException | None:
        llm = self._llm
        if self._dead is None and llm is not None and not self._closed and llm.errored:
            self._mark_dead(self._vllm.EngineDeadError("the vLLM engine core stopped"))
        return self._dead

    async def check_health(self) -> None:
        llm = self._require_llm()
        try:
            await llm.check_health()
        except Exception as exc:
            self._mark_dead(exc)
            raise EngineUnavailable("engine is not available") from exc

    def stats(self) -> EngineStats:
        return self._sink.snapshot()

    @property
    def frontend(self) -> VLLMFrontend | None:
        return self._frontend if self._llm is not None else None

    def _require_llm(self) -> Any:
        if self._closed:
            raise EngineUnavailable("engine is shut down")
        if self._llm is None:
            raise EngineUnavailable("engine is starting")
        if self.dead is not None:
            raise EngineUnavailable("engine is not available")
        return self._llm

    def _mark_dead(self, error: BaseException) -> None:
        if self._dead is None:
            self._dead = error
            log.error("vLLM engine died: %r", error, exc_info=error)

    # -- prompts ------------------------------------------------------------------------------

    async def render_chat(self, messages: list[dict[str, Any]]) -> Prompt:
        self._require_llm()
        if content_length(messages) > _OFFLOAD_RENDER_CHARS:
            return await asyncio.to_thread(self._render_chat, messages)
        return self._render_chat(messages)

    def _render_chat(self, messages: list[dict[str, Any]]) -> Prompt:
        try:
            text = render_chat_text(self._tokenizer, messages)
        except InvalidRequest:
            raise
        except Exception as exc:  # jinja2 errors raised by the template itself
            raise InvalidRequest(
                f"the model's chat template rejected the messages: {exc}", param="messages"
            ) from None
        ids = encode(self._tokenizer, text, add_special_tokens=False)
        return Prompt(text=text, token_ids=ids, num_tokens=len(ids))

    async def render_completion(self, prompt: str) -> Prompt:
        self._require_llm()
        if len(prompt) > _OFFLOAD_RENDER_CHARS:
            ids = await asyncio.to_thread(encode, self._tokenizer, prompt, add_special_tokens=True)
        else:
            ids = encode(self._tokenizer, prompt, add_special_tokens=True)
        return Prompt(text=prompt, token_ids=ids, num_tokens=len(ids))

    # -- generation ---------------------------------------------------------------------------

    async def generate(
        self, prompt: Prompt, options: SamplingOptions, request_id: str
    ) -> AsyncGenerator[Delta, None]:
        llm = self._require_llm()
        token_ids = prompt.token_ids
        if token_ids is None:
            token_ids = (await self.render_completion(prompt.text or "")).token_ids or []
        if len(token_ids) + options.max_tokens > self.max_model_len:
            raise PromptTooLong(len(token_ids), self.max_model_len)
        held = contextlib.ExitStack()  # the adapter's use, until the request ends
        stream = llm.generate(
            self._vllm.tokens_input(token_ids),
            self._sampling_params(options),
            request_id,
            **self._priority(options),
            **self._lora(options, held),
        )
        finished = False
        self._in_flight.add(request_id)
        try:
            async for output in stream:
                delta = _delta_of(output)
                if delta is not None:
                    finished = delta.finish_reason is not None
                    yield delta
            if not finished and request_id not in self._aborting:
                # vLLM ended it without a finish: never pass a cut answer off as complete (seen
                # when one of several data-parallel engines died)
                if self.dead is not None:
                    raise EngineUnavailable("engine is not available")
                raise EngineError("the engine ended the request before it finished")
        except self._vllm.EngineDeadError as exc:
            self._mark_dead(exc)
            raise EngineUnavailable("engine is not available") from exc
        except (EngineError, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            log.exception("generation of %s failed", request_id)
            if self.dead is not None:
                raise EngineUnavailable("engine is not available") from exc
            raise EngineError("generation failed") from exc
        finally:
            self._in_flight.discard(request_id)
            self._aborting.discard(request_id)
            # Closing our iterator early (client gone) closes vLLM's, which aborts the request.
            await stream.aclose()
            held.close()

    async def abort(self, request_id: str) -> None:
        if self._llm is not None and not self._closed:
            self._aborting.add(request_id)  # its stream then ends without a finish, as asked
            await self._llm.abort(request_id)

    def _sampling_params(self, options: SamplingOptions) -> Any:
        requested = {
            "temperature": options.temperature,
            "top_p": options.top_p,
            "presence_penalty": options.presence_penalty,
            "frequency_penalty": options.frequency_penalty,
            "repetition_penalty": options.repetition_penalty,
            "top_k": options.top_k,
        }
        values = {**self._sampling_defaults}
        values.update({k: v for k, v in requested.items() if v is not None})
        try:
            return self._vllm.SamplingParams(
                **values,
                max_tokens=options.max_tokens,
                stop=list(options.stop) or None,
                seed=options.seed,
                ignore_eos=options.ignore_eos,
                output_kind=self._vllm.RequestOutputKind.DELTA,
            )
        except (ValueError, self._vllm.VLLMValidationError) as exc:  # vLLM's range checks
            raise InvalidRequest(str(exc)) from None

    def _lora(self, options: SamplingOptions, held: contextlib.ExitStack) -> dict[str, Any]:
        if options.adapter is None:
            return {}
        lora = self._loras.get(options.adapter) if self._loras is not None else None
        if lora is None:
            raise InvalidRequest(f"This server has no adapter {options.adapter!r}.", param="model")
        assert self._loras is not None
        held.enter_context(self._loras.running(lora))
        return {"lora_request": lora}

    # -- LoRA adapters at run time (engine/served.py decides; vllm_adapters.py keeps them) ----

    async def load_adapter(self, name: str, path: str) -> LoadedAdapter:
        loras = self._lora_set_in_use()
        path = vllm_lora.adapter_path(path)
        limit = int(self._launch.engine_args["max_lora_rank"]) if self._launch else 0
        setting = (
            f"engine.lora.max_lora_rank ({limit})"
            if self._config.lora.max_lora_rank
            else f"this engine's max_lora_rank ({limit}; set engine.lora.max_lora_rank and "
            "restart to serve larger ones)"
        )
        problem = vllm_lora.adapter_problem(path, limit, setting, self._module_shapes())
        if problem is not None:
            raise InvalidRequest(f"Adapter {name!r}: {problem}.", code="adapter_invalid",
                                 param="path")  # fmt: skip
        return LoadedAdapter(name, path, await loras.load(name, path))

    def serve_adapter(self, adapter: LoadedAdapter) -> None:
        assert self._loras is not None  # load_adapter made it: the engine has started
        self._loras.serve(adapter.handle)

    def retire_adapter(self, name: str) -> int:
        # Never raises, dead engine or not. Before the start nothing runs on it (the engine then
        # loads its file's adapters; the catalog keeps requests from reaching this one).
        return self._loras.retire(name) if self._loras is not None else 0

    async def discard_adapter(self, adapter: LoadedAdapter) -> None:
        if self._loras is not None:
            await self._loras.discard(adapter.handle)

    def _lora_set(self, llm: Any) -> LoraSet:
        assert self._launch is not None
        capacity = vllm_lora.adapter_capacity(self._launch.engine_args, self._launch.device)
        return LoraSet(llm, self._vllm.LoRARequest, self.model_name, capacity,
                       lambda: self.dead is not None)  # fmt: skip

    def _lora_set_in_use(self) -> LoraSet:
        self._require_llm()
        loras = self._loras
        if loras is None or loras.capacity == 0:
            raise Conflict(
                "This engine was started without LoRA: set engine.lora.max_loras (slots for "
                "adapters loaded at run time) and restart.", code="lora_disabled",
            )  # fmt: skip
        return loras

    def _module_shapes(self) -> dict[str, tuple[int, int]] | None:
        try:
            return vllm_lora.module_shapes(self._llm.model_config.hf_text_config)
        except (AttributeError, TypeError, ValueError):  # not a Llama-style model: not checked
            return None

    def _priority(self, options: SamplingOptions) -> dict[str, int]:
        if self._launch is None or not self._launch.priority_scheduling:
            return {}
        return {"priority": -options.priority}  # vLLM serves lower values first; we, higher


def _engine_arg_objects(engine_args: dict[str, Any]) -> dict[str, Any]:
    """AsyncEngineArgs keywords with the config sections vLLM wants as objects built."""
    structured = engine_args.get("structured_outputs_config")
    if not isinstance(structured, dict):
        return engine_args
    from vllm.config import StructuredOutputsConfig

    return {**engine_args, "structured_outputs_config": StructuredOutputsConfig(**structured)}


def _lora_requests(lora_request: Any, config: EngineConfig) -> dict[str, Any]:
    """vLLM's LoRARequest of each adapter of engine.lora, with its stable id (vllm_lora.py)."""
    base = config.model_name
    return {
        a.name: lora_request(
            lora_name=a.name, lora_int_id=a.lora_id, lora_path=a.path, base_model_name=base
        )
        for a in vllm_lora.adapters(config)
    }


def _in_daemon_thread(work: Callable[[], None]) -> tuple[threading.Thread, asyncio.Future[None]]:
    """Run `work` in a daemon thread of its own; the future resolves when it ends. Not the
    loop's executor, whose threads are joined when the loop closes: vLLM's start-up may wait up
    to 600 s for the engines of other nodes, and a SIGTERM then must end the process at once
    (VLLMEngine._wait_for_start_thread decides when to wait for it)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def finish(error: BaseException | None) -> None:
        if done.done():
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    def run() -> None:
        error: BaseException | None = None
        try:
            work()
        except BaseException as exc:  # handed to the awaiting task
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(finish, error)

    thread = threading.Thread(target=run, name="llmserve-engine-start", daemon=True)
    thread.start()
    return thread, done


def _delta_of(output: Any) -> Delta | None:
    completion = output.outputs[0]
    reason = _finish_reason(completion.finish_reason) if output.finished else None
    num_tokens = len(completion.token_ids)
    if not completion.text and not num_tokens and reason is None:
        return None
    return Delta(text=completion.text, num_tokens=num_tokens, finish_reason=reason)


def _finish_reason(reason: Any) -> str | None:
    name = str(reason) if reason is not None else None
    if name in (None, "abort"):
        return None  # an aborted request simply ends; the gateway knows why it aborted
    if name == "error":
        raise EngineError("the engine failed this request")
    return "length" if name == "length" else "stop"


def _sampling_defaults(llm: Any) -> dict[str, Any]:
    try:
        defaults = llm.model_config.get_diff_sampling_param()
    except Exception:  # a model without a usable generation config: vLLM's neutral defaults
        return {}
    return {k: v for k, v in defaults.items() if k in _DEFAULTABLE}


def _check_model_exists(model: str) -> None:
    looks_local = model.startswith((".", "/", "~")) or Path(model).exists()
    if looks_local and not Path(model).expanduser().is_dir():
        hint = " (run `llmserve models prepare`)" if "smollm2" in model else ""
        raise EngineStartError(f"engine.model: no model directory at {model}{hint}")


def _engine_core_processes(llm: Any) -> list[Any]:
    """The engine-core processes (multiprocessing.Process) of `llm`: vLLM internals, read here
    only, so that close() can make sure they are gone."""
    resources = getattr(getattr(llm, "engine_core", None), "resources", None)
    manager = getattr(resources, "engine_manager", None)
    return list(getattr(manager, "processes", None) or [])


def _shutdown(llm: Any) -> None:
    """Stop the engine and make sure its engine-core processes are gone (synchronous)."""
    processes = _engine_core_processes(llm)
    llm.shutdown()  # SIGTERM, up to 5 s of grace, then SIGKILL without waiting
    _reap(processes)


def _reap(processes: list[Any], timeout: float = 10.0) -> None:
    # vLLM's SIGKILL fallback does not wait for the process: join so no zombie or straggler is
    # left when close() returns.
    for process in processes:
        process.join(timeout)
        if process.is_alive():
            log.warning("engine core %s did not exit; killing it", process.pid)
            process.kill()
            process.join(timeout)


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def check_engine_options(config: EngineConfig) -> None:
    """Raise EngineStartError for `engine.options` or `engine.frontend_options` vLLM would
    refuse (imports vllm)."""
    check_options(config.options, _engine_arg_names())
    frontend_args(config, _frontend_arg_names())


def _frontend_arg_names() -> set[str]:
    from vllm.entrypoints.launchers.cli_args import FrontendArgs

    return {f.name for f in dataclasses.fields(FrontendArgs)}


def _engine_arg_names() -> set[str]:
    from vllm.engine.arg_utils import AsyncEngineArgs

    return {f.name for f in dataclasses.fields(AsyncEngineArgs)}


def _import_vllm() -> SimpleNamespace:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.exceptions import VLLMValidationError
    from vllm.inputs import tokens_input
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.exceptions import EngineDeadError

    return SimpleNamespace(
        AsyncEngineArgs=AsyncEngineArgs,
        AsyncLLM=AsyncLLM,
        EngineDeadError=EngineDeadError,
        LoRARequest=LoRARequest,
        RequestOutputKind=RequestOutputKind,
        SamplingParams=SamplingParams,
        tokens_input=tokens_input,
        VLLMValidationError=VLLMValidationError,
    )
