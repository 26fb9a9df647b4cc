"""vLLM's own OpenAI request handling, embedded behind the `OpenAIFrontend` seam.

Requests the gateway's fast path does not handle itself (tools, structured outputs, logprobs,
n > 1, echo, reasoning output, the Responses API, /tokenize) are answered by the very serving
classes `vllm serve` uses, built by vLLM's own `init_app_state` from vLLM's own argument parser,
so they behave exactly as `vllm serve` does with the same flags.

Everything the gateway adds happens at one point: every generation those classes start goes
through `GatedEngineClient.generate`, which asks the request's `GenerationGate` (limits, then
the admission queue) with the exact prompt length, `max_tokens` and `n` vLLM computed, and tells
it each output token and the end. The gate of the current HTTP request travels in a context
variable, which is copied into any task vLLM starts for the request.

Only this module and `vllm.py` import vllm.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, MutableMapping
from typing import Any

from pydantic import BaseModel, ValidationError

from llmserve.engine.base import (
    FrontendRoute,
    GatePass,
    GenerationGate,
    JSONReply,
    StreamReply,
)
from llmserve.engine.vllm_adapters import LoraSet
from llmserve.errors import (
    APIError,
    EngineFailed,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
)

log = logging.getLogger(__name__)

_GATE: contextvars.ContextVar[GenerationGate | None] = contextvars.ContextVar(
    "llmserve_gate", default=None
)


class GateRefused(Exception):
    """Raised into vLLM's code when the gate refuses a generation; the gate keeps the real
    error (vLLM wraps or swallows exceptions from the engine client, so the handler asks the
    gate, never this exception, what went wrong)."""


class GatedEngineClient:
    """vLLM's engine client (AsyncLLM) with every generation passed through the request's gate,
    and counted on its LoRA adapter (vllm_adapters.py). Everything else is the wrapped client's
    own attribute."""

    def __init__(
        self,
        llm: Any,
        rejections: tuple[type[BaseException], ...],
        loras: LoraSet,
        not_found: Callable[[str], BaseException],
    ) -> None:
        self._llm = llm
        self._rejections = rejections  # what vLLM raises for a request it will not run
        self._loras = loras
        self._not_found = not_found  # vLLM's own 404 (an adapter unloaded meanwhile)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    async def generate(
        self, prompt: Any, sampling_params: Any, request_id: str, **kwargs: Any
    ) -> AsyncGenerator[Any, None]:
        gate = _GATE.get()
        if gate is None:  # a generation no gated request started: never run it unmetered
            log.error("refused an ungated vLLM generation %s", request_id)
            raise RuntimeError("generation outside a gated request")
        n = int(getattr(sampling_params, "n", 1) or 1)
        max_tokens = int(sampling_params.max_tokens or 0)
        requested_priority = int(kwargs.get("priority") or 0)
        held = self._hold_adapter(kwargs.get("lora_request"))
        try:
            admitted = await _enter(gate, _prompt_length(prompt), max_tokens, n,
                                    requested_priority)  # fmt: skip
            kwargs["priority"] = admitted.engine_priority
            counter = _OutputCounter(sampling_params)
            if not counter.delta:
                admitted.first_token_unseen()
            try:
                stream = self._llm.generate(prompt, sampling_params, request_id, **kwargs)
                try:
                    async for output in stream:
                        counter.observe(output, admitted)
                        yield output
                except self._rejections:  # vLLM's input checks: nothing ran
                    admitted.on_rejected()
                    raise
                finally:
                    await stream.aclose()  # aborts the engine request when it did not finish
            finally:
                await admitted.close()
        finally:
            held.close()

    def _hold_adapter(self, lora: Any) -> contextlib.ExitStack:
        """The generation's use of its adapter (none for the base model), until it ends."""
        held = contextlib.ExitStack()
        if lora is not None:
            try:
                held.enter_context(self._loras.running(lora))
            except NotFound as exc:
                raise self._not_found(exc.message) from None
        return held


async def _enter(
    gate: GenerationGate, prompt_tokens: int, max_tokens: int, n: int, priority: int
) -> GatePass:
    try:
        return await gate.enter(prompt_tokens, max_tokens, n, priority)
    except APIError:
        raise GateRefused() from None


class _OutputCounter:
    """New output tokens in each RequestOutput, whatever the output kind vLLM asked for."""

    def __init__(self, sampling_params: Any) -> None:
        kind = getattr(getattr(sampling_params, "output_kind", None), "name", "DELTA")
        self._delta = kind == "DELTA"
        self._seen: dict[int, int] = {}
        self._finished: set[int] = set()

    @property
    def delta(self) -> bool:
        """Outputs come as they are made (DELTA); else only whole (FINAL_ONLY, CUMULATIVE)."""
        return self._delta

    def observe(self, output: Any, admitted: GatePass) -> None:
        for completion in output.outputs:
            count = len(completion.token_ids)
            if not self._delta:
                before = self._seen.get(completion.index, 0)
                self._seen[completion.index] = max(before, count)
                count = max(0, count - before)
            if count:
                admitted.on_tokens(count)
            reason = completion.finish_reason
            if reason is not None and completion.index not in self._finished:
                self._finished.add(completion.index)
                admitted.on_finish(None if str(reason) == "abort" else str(reason))


def _prompt_length(prompt: Any) -> int:
    if isinstance(prompt, Mapping):
        for key in ("prompt_token_ids", "encoder_prompt_token_ids"):
            ids = prompt.get(key)
            if ids is not None:
                return len(ids)
        decoder = prompt.get("decoder_prompt")
        if isinstance(decoder, Mapping):
            return _prompt_length(decoder)
    ids = getattr(prompt, "prompt_token_ids", None)
    return len(ids) if ids is not None else 0


class VLLMFrontend:
    """vLLM's serving objects (chat, completions, responses, tokenization) over one engine."""

    def __init__(
        self,
        state: Any,
        request_models: Mapping[str, type[BaseModel]],
        errors: EngineErrors,
    ) -> None:
        self._state = state
        self._models = request_models
        self._errors = errors

    @property
    def lora_registry(self) -> MutableMapping[str, Any]:
        """The adapters vLLM's handlers know, by name (OpenAIServingModels.lora_requests): kept
        equal to the fast path's by vllm_adapters.LoraSet, so both run one loaded copy."""
        registry: MutableMapping[str, Any] = self._state.openai_serving_models.lora_requests
        return registry

    def request_fields(self, route: FrontendRoute) -> frozenset[str]:
        if route == "tokenize":
            return frozenset(self._models["tokenize_chat"].model_fields) | frozenset(
                self._models["tokenize_completion"].model_fields
            )
        return frozenset(self._models[route].model_fields)

    async def handle(
        self, route: FrontendRoute, body: dict[str, Any], gate: GenerationGate
    ) -> JSONReply | StreamReply:
        request = self._validate(route, body)
        token = _GATE.set(gate)
        try:
            result = await self._call(route, request)
        finally:
            _GATE.reset(token)
        return self._reply(route, result, gate)

    def _validate(self, route: FrontendRoute, body: dict[str, Any]) -> BaseModel:
        name: str = route
        if route == "tokenize":
            name = "tokenize_chat" if "messages" in body else "tokenize_completion"
        try:
            return self._models[name].model_validate(body)
        except ValidationError as exc:
            raise validation_error(exc) from None
        except (ValueError, TypeError) as exc:  # vLLM's own model validators
            raise InvalidRequest(str(exc)) from None

    async def _call(self, route: FrontendRoute, request: Any) -> Any:
        state = self._state
        try:
            if route == "chat":
                return await state.openai_serving_chat.create_chat_completion(request, None)
            if route == "completions":
                return await state.openai_serving_completion.create_completion(request, None)
            if route == "responses":
                return await state.openai_serving_responses.create_responses(request, None)
            if route == "tokenize":
                return await state.serving_tokenization.create_tokenize(request, None)
            return await state.serving_tokenization.create_detokenize(request, None)
        except GateRefused:
            return None  # the handler raises the gate's own error
        except Exception as exc:
            raise self._errors.as_api_error(exc) from None

    def _reply(
        self, route: FrontendRoute, result: Any, gate: GenerationGate
    ) -> JSONReply | StreamReply:
        if result is None:
            raise ServiceUnavailable("The request was refused before it reached the engine.")
        if _is_error(result):
            raise api_error(result.error.code, result.error.message, result.error.param)
        if isinstance(result, BaseModel):
            return JSONReply(result.model_dump_json(by_alias=route == "responses").encode())
        events = _response_events(result) if route == "responses" else result
        return StreamReply(_gated_events(events, gate, self._errors))


async def _gated_events(
    events: AsyncIterator[str], gate: GenerationGate, errors: EngineErrors
) -> AsyncIterator[str]:
    """vLLM's events, iterated with the request's gate in context (a stream generator only
    starts the engine request when first iterated). An error before the first event (a bad
    grammar, say) is raised, so the client gets its HTTP status rather than a stream."""
    token = _GATE.set(gate)
    first = True
    try:
        async for event in events:
            if first and event.startswith('data: {"error"'):
                raise _error_event(event)
            first = False
            yield event
    except GateRefused:
        return  # the handler raises the gate's own error
    except APIError:
        raise
    except Exception as exc:
        if not first:
            raise
        raise errors.as_api_error(exc) from None
    finally:
        _GATE.reset(token)
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


async def _response_events(events: AsyncIterator[Any]) -> AsyncIterator[str]:
    """The Responses API's stream events as SSE, as `vllm serve` writes them."""
    async for event in events:
        kind = getattr(event, "type", "unknown")
        yield f"event: {kind}\ndata: {event.model_dump_json(indent=None, by_alias=True)}\n\n"


def _error_event(event: str) -> APIError:
    try:
        error = json.loads(event.removeprefix("data: "))["error"]
        return api_error(int(error.get("code") or 500), str(error["message"]), error.get("param"))
    except (ValueError, KeyError, TypeError):
        return api_error(500, event[:200])


class EngineErrors:
    """vLLM's exception classes, mapped to the gateway's errors (the HTTP status vLLM's own
    server would give them)."""

    def __init__(self, client: tuple[type[BaseException], ...],
                 not_found: tuple[type[BaseException], ...],
                 unavailable: tuple[type[BaseException], ...]) -> None:  # fmt: skip
        self.client: tuple[type[BaseException], ...] = (ValueError, TypeError, *client)
        self._not_found = not_found
        self._unavailable = unavailable

    def as_api_error(self, exc: BaseException) -> APIError:
        if isinstance(exc, APIError):
            return exc
        if isinstance(exc, self._not_found):
            return NotFound(str(exc), code="not_found")
        if isinstance(exc, self.client):
            return InvalidRequest(str(exc))
        if isinstance(exc, self._unavailable):
            return ServiceUnavailable(
                "The model engine is unavailable; retry shortly.", code="engine_unavailable"
            )
        log.error("vLLM's handler failed: %r", exc, exc_info=exc)
        return EngineFailed("The model failed while processing this request; please retry.")


def _is_error(result: Any) -> bool:
    return type(result).__name__ == "ErrorResponse" and hasattr(result, "error")


def api_error(status: int, message: str, param: str | None = None) -> APIError:
    """An error vLLM's serving code answered with, as the gateway's error of that status."""
    if status == 404:
        return NotFound(message, param=param, code="not_found")
    if status in (400, 422, 501):
        return InvalidRequest(message, param=param)
    if status == 503:
        return ServiceUnavailable(message, code="engine_unavailable")
    log.error("vLLM answered %s: %s", status, message)
    return EngineFailed("The model failed while processing this request; please retry.")


def validation_error(exc: ValidationError) -> InvalidRequest:
    err = first_error(exc)
    where = ".".join(str(part) for part in err["loc"] if not _is_union_branch(part))
    message = err["msg"].removeprefix("Value error, ")
    if where:
        return InvalidRequest(f"Invalid value for '{where}': {message}.", param=where)
    return InvalidRequest(f"Invalid request: {message}.")


def first_error(exc: ValidationError) -> dict[str, Any]:
    """The first of `exc`'s errors (its type, loc and msg). `errors()` builds a dict per error,
    a third of a second for the 65,536 a request body may hold (server.max_json_values); their
    JSON text is built ten times faster, and only its first item is decoded."""
    if exc.error_count() <= 64:
        return dict(exc.errors(include_url=False)[0])
    text = exc.json(include_url=False, include_context=False, include_input=False)
    first: dict[str, Any] = json.JSONDecoder().raw_decode(text, 1)[0]
    return first


def _is_union_branch(part: Any) -> bool:
    text = str(part)
    return "[" in text or text[:1].isupper() or text in ("str", "int", "float", "bool")


async def build_frontend(llm: Any, serve_args: list[str], loras: LoraSet) -> VLLMFrontend:
    """vLLM's serving state for `llm`, from `vllm serve`-style arguments (the model first);
    its generations are counted on their adapters in `loras`."""
    from starlette.datastructures import State
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
    from vllm.entrypoints.serve.tokenize.protocol import (
        DetokenizeRequest,
        TokenizeChatRequest,
        TokenizeCompletionRequest,
    )
    from vllm.exceptions import GracefulHTTPError, VLLMClientError, VLLMNotFoundError
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    from vllm.v1.engine.exceptions import EngineDeadError

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(serve_args)
    validate_parsed_serve_args(args)
    # the engine's own structured-output settings (reasoning parser included) win
    args.structured_outputs_config = llm.vllm_config.structured_outputs_config
    errors = EngineErrors((VLLMClientError,), (VLLMNotFoundError,),
                          (EngineDeadError, GracefulHTTPError))  # fmt: skip
    state = State()
    client = GatedEngineClient(llm, errors.client, loras, VLLMNotFoundError)
    await init_app_state(client, state, args, await llm.get_supported_tasks())
    models: dict[str, type[BaseModel]] = {
        "chat": ChatCompletionRequest,
        "completions": CompletionRequest,
        "responses": ResponsesRequest,
        "tokenize_chat": TokenizeChatRequest,
        "tokenize_completion": TokenizeCompletionRequest,
        "detokenize": DetokenizeRequest,
    }
    return VLLMFrontend(state, models, errors)
