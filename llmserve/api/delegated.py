"""Requests answered by the engine's own OpenAI frontend (vLLM's serving classes), with the
gateway's controls on top: auth and the model check here, limits and admission at each
generation (api/gate.py), the response (JSON or SSE) written here.

Routes: whatever the fast path passes on from /v1/chat/completions and /v1/completions (tools,
structured outputs, logprobs, n > 1, ...), and /v1/responses, /tokenize, /detokenize.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from collections.abc import Iterator
from typing import Any

from aiohttp import web

from llmserve.admission.deadline import REQUEST_TIMEOUT_HEADER, request_deadline
from llmserve.api import fields
from llmserve.api.gate import Caller, RequestGate, bounded_metadata
from llmserve.api.gateway import Gateway
from llmserve.api.models import ModelRename
from llmserve.api.sse import SSEStream
from llmserve.api.stream import StreamLifecycle
from llmserve.auth.principal import Principal
from llmserve.engine.base import FrontendRoute, JSONReply, OpenAIFrontend, StreamReply
from llmserve.errors import (
    APIError,
    DeadlineExceeded,
    InternalError,
    InvalidRequest,
    shutting_down,
)
from llmserve.records import RequestRecord
from llmserve.request_state import RECORD

log = logging.getLogger("llmserve.gateway")

_MAX_TOKENS_FIELD = {
    "chat": "max_tokens",
    "completions": "max_tokens",
    "responses": "max_output_tokens",
}
_OUTPUT_LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


async def delegate(
    request: web.Request,
    gateway: Gateway,
    principal: Principal,
    route: FrontendRoute,
    body: dict[str, Any],
    not_native: InvalidRequest | None = None,
) -> web.StreamResponse:
    """Answer the request through the engine's frontend; without one, `not_native` is the 400.
    `body` is the parsed request (api/body.py: parsed once, its shape bounded); it is changed
    here (fields stripped, defaults added) before the frontend validates it."""
    frontend = frontend_of(gateway, not_native)
    record = request[RECORD]
    model = body.get("model")
    if model is None and route in ("tokenize", "detokenize"):
        model = body["model"] = gateway.engine.model_name  # optional there, as in vLLM
    if not isinstance(model, str):
        raise InvalidRequest("Missing required parameter: 'model'.", param="model")
    served = gateway.check_model(model, principal)
    record.model, record.root_model = model, served.root
    # vLLM's handlers know the base model and the adapters, not the aliases: they get the model
    # an alias stands for, and the response is given the requested name back
    rename = ModelRename(served.root, model) if served.alias else None
    if rename is not None:
        body["model"] = served.root
    _prepare_body(gateway, frontend, route, body, principal, record)
    tier_name, tier = gateway.tier_of(principal)
    caller = Caller(principal, tier_name, tier.priority, _deadline(request, gateway), route)
    gate = RequestGate(gateway, request, caller)
    if route in ("tokenize", "detokenize"):
        await _count_request(gate)
    record.stream = bool(body.get("stream"))
    try:
        if record.stream:
            return await _stream(request, gateway, frontend, route, body, gate, rename)
        return await _json(request, gateway, frontend, route, body, gate, rename)
    finally:
        await gate.close()


def frontend_of(gateway: Gateway, not_native: InvalidRequest | None = None) -> OpenAIFrontend:
    """The engine's frontend; without one, `not_native` (or the route's own 400) is raised."""
    frontend = gateway.engine.frontend
    if frontend is None:
        if not_native is not None:
            # a copy: raised itself, it would hold this frame, which holds it, in its traceback,
            # a reference cycle that keeps the request's parsed body until a garbage collection
            raise copy.copy(not_native).with_traceback(None)
        raise InvalidRequest(
            f"This route is not available with engine.kind {gateway.config.engine.kind!r}.",
            code="unsupported_route",
        )
    return frontend


def _prepare_body(
    gateway: Gateway,
    frontend: OpenAIFrontend,
    route: FrontendRoute,
    body: dict[str, Any],
    principal: Principal,
    record: RequestRecord,
) -> None:
    fields.check_refused(body)
    if route == "responses":
        fields.check_responses_store(body)
    record.metadata = bounded_metadata(body.get("metadata"))
    known = frontend.request_fields(route)
    fields.strip_for_engine(route, body, known)
    fields.check_known(body, known)
    if route in _MAX_TOKENS_FIELD and not any(body.get(name) for name in _OUTPUT_LIMITS):
        default = gateway.default_max_tokens(gateway.tier_of(principal)[0], principal)
        default = default or gateway.config.engine.default_max_tokens
        if default:
            body[_MAX_TOKENS_FIELD[route]] = default


async def _count_request(gate: RequestGate) -> None:
    """Tokenization runs no generation, but it is a request: it counts against
    requests_per_minute (and costs no tokens)."""
    gate_pass = await gate.enter(0, 0, 1, 0)
    await gate_pass.close()


async def _json(
    request: web.Request,
    gateway: Gateway,
    frontend: OpenAIFrontend,
    route: FrontendRoute,
    body: dict[str, Any],
    gate: RequestGate,
    rename: ModelRename | None = None,
) -> web.Response:
    with _guard(request, gateway, gate):
        reply = await frontend.handle(route, body, gate)
    if not isinstance(reply, JSONReply):  # a stream for a request that asked for none
        raise InternalError("The engine answered with a stream; retry with stream: true.")
    answer = reply.body if rename is None else rename.body(reply.body)
    headers = {**gate.headers}
    waited = request[RECORD].queue_wait_seconds
    if waited is not None:
        headers["X-Queue-Wait-Ms"] = str(int(waited * 1000))
    return web.Response(
        body=answer, status=reply.status, headers=headers, content_type="application/json"
    )


async def _stream(
    request: web.Request,
    gateway: Gateway,
    frontend: OpenAIFrontend,
    route: FrontendRoute,
    body: dict[str, Any],
    gate: RequestGate,
    rename: ModelRename | None = None,
) -> web.StreamResponse:
    lifecycle = StreamLifecycle(request, gateway.heartbeats, {}, lambda: gateway.force_stopping)

    async def relay(sse: SSEStream) -> None:
        gate.sse = sse  # heartbeats say the queue position; reservation headers go on it
        with _guard(request, gateway, gate):
            reply = await frontend.handle(route, body, gate)
            if not isinstance(reply, StreamReply):
                raise InternalError("The engine answered a stream request without a stream.")
            await _pump(reply, gate, sse, rename)

    return await lifecycle.run(relay)


async def _pump(
    reply: StreamReply, gate: RequestGate, sse: SSEStream, rename: ModelRename | None = None
) -> None:
    """vLLM's events to the client; a refusal by the gate replaces vLLM's own error event."""
    async with contextlib.aclosing(reply.events) as events:  # type: ignore[type-var]
        async for event in events:
            gate.raise_refusal()
            await sse.send((event if rename is None else rename.text(event)).encode())
    gate.raise_refusal()
    await sse.drain()
    sse.request[RECORD].delivered = True


@contextlib.contextmanager
def _guard(request: web.Request, gateway: Gateway, gate: RequestGate) -> Iterator[None]:
    """The gate's refusal, the client's deadline and shutdown, as the gateway's own errors.

    vLLM's handlers turn a cancellation into an error response of their own, so a deadline or
    a shutdown that cancels this task is recognised by the task's state, not by the exception.
    """
    task = asyncio.current_task()
    assert task is not None
    deadline = gate.deadline
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    before = task.cancelling()
    handle = None if deadline is None else asyncio.get_running_loop().call_at(deadline, expire)
    try:
        yield
    except asyncio.CancelledError:
        pass  # decided below: a deadline, a shutdown, or the client gone
    except APIError:
        if task.cancelling() <= before:
            gate.raise_refusal()  # the gate's own error wins over vLLM's wrapping of it
            raise
    finally:
        if handle is not None:
            handle.cancel()
    _raise_outcome(task, before, expired, gateway, gate)


def _raise_outcome(
    task: asyncio.Task[Any], before: int, expired: bool, gateway: Gateway, gate: RequestGate
) -> None:
    """After the guarded block: raise what ended it, if anything did."""
    cancelled = task.cancelling() > before
    if expired and cancelled:
        task.uncancel()
        cancelled = task.cancelling() > before
        if not cancelled:
            raise DeadlineExceeded(
                f"The request did not finish within its deadline ({REQUEST_TIMEOUT_HEADER}); "
                "allow more time or ask for fewer tokens."
            )
    if cancelled:
        if gateway.force_stopping:
            task.uncancel()
            raise shutting_down(cut_short=True)
        raise asyncio.CancelledError()  # the client went away
    gate.raise_refusal()


def _deadline(request: web.Request, gateway: Gateway) -> float | None:
    return request_deadline(
        request.headers.get(REQUEST_TIMEOUT_HEADER),
        gateway.config.queue.default_timeout_seconds,
        asyncio.get_running_loop().time(),
    )
