"""POST /v1/chat/completions, /v1/completions and /v1/responses, /tokenize and /detokenize.

Plain text generation takes the fast path (api/schemas.py, api/gateway.py); everything else is
answered by the engine's own OpenAI frontend (api/delegated.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable
from typing import Any

from aiohttp import web

from llmserve.admission.deadline import REQUEST_TIMEOUT_HEADER, request_deadline
from llmserve.api import objects
from llmserve.api.body import JSONLimits, parse_json_body, read_json_body
from llmserve.api.delegated import delegate, frontend_of
from llmserve.api.gateway import Gateway, Job
from llmserve.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    NotNative,
    parse_request,
)
from llmserve.app_state import GATEWAY
from llmserve.auth.principal import Principal
from llmserve.engine.base import FrontendRoute, Prompt
from llmserve.engine.catalog import ServedModel
from llmserve.errors import APIError
from llmserve.request_state import PRINCIPAL, RECORD


async def chat_completions(request: web.Request) -> web.StreamResponse:
    gateway, principal = await _begin(request)
    return await _counting_refusals(request, gateway, principal, _chat(request, gateway, principal))


async def completions(request: web.Request) -> web.StreamResponse:
    gateway, principal = await _begin(request)
    work = _completions(request, gateway, principal)
    return await _counting_refusals(request, gateway, principal, work)


async def responses(request: web.Request) -> web.StreamResponse:
    return await _delegated(request, "responses")


async def tokenize(request: web.Request) -> web.StreamResponse:
    return await _delegated(request, "tokenize")


async def detokenize(request: web.Request) -> web.StreamResponse:
    return await _delegated(request, "detokenize")


async def _delegated(request: web.Request, route: FrontendRoute) -> web.StreamResponse:
    gateway, principal = await _begin(request)

    async def work() -> web.StreamResponse:
        raw = await _body(request, gateway)
        frontend_of(gateway)  # without one, the route's 400 comes before any parsing
        body = await _parse(raw, gateway)
        return await delegate(request, gateway, principal, route, body)

    return await _counting_refusals(request, gateway, principal, work())


# A refusal a caller caused before the limiter saw the request (a bad body, an unknown model, a
# refused field) still costs it one request of its requests_per_minute: invalid requests are
# not free. Refusals by the limiter itself (429) or the server's own 503s are not counted again.
_CALLER_ERRORS = frozenset({400, 403, 404, 405, 408, 413, 415, 422})


async def _counting_refusals(
    request: web.Request,
    gateway: Gateway,
    principal: Principal,
    work: Awaitable[web.StreamResponse],
) -> web.StreamResponse:
    try:
        return await work
    except APIError as exc:
        if exc.status in _CALLER_ERRORS and not request[RECORD].admitted:
            await gateway.charge_refused_request(principal, request[RECORD].tier)
        raise


async def _chat(request: web.Request, gateway: Gateway, principal: Principal) -> web.StreamResponse:
    body = await _parse(await _body(request, gateway), gateway)
    if gateway.config.engine.reasoning_parser and gateway.engine.frontend is not None:
        return await delegate(request, gateway, principal, "chat", body)
    try:
        params = parse_request(ChatCompletionRequest, body)
    except NotNative as exc:  # the body parsed once serves the engine's frontend too
        return await delegate(request, gateway, principal, "chat", body, exc)
    served = gateway.check_model(params.model, principal)
    _note_model(request, served)  # after the check: only a real model name is recorded
    prompt = await gateway.engine.render_chat(params.messages)
    job = _job(request, gateway, principal, params, prompt, chat=True)
    return await gateway.run(request, _on_model(job, served))


async def _completions(
    request: web.Request, gateway: Gateway, principal: Principal
) -> web.StreamResponse:
    body = await _parse(await _body(request, gateway), gateway)
    try:
        params = parse_request(CompletionRequest, body)
    except NotNative as exc:
        return await delegate(request, gateway, principal, "completions", body, exc)
    served = gateway.check_model(params.model, principal)
    _note_model(request, served)  # after the check: only a real model name is recorded
    prompt = await gateway.engine.render_completion(params.prompt_text)
    job = _job(request, gateway, principal, params, prompt, chat=False)
    return await gateway.run(request, _on_model(job, served))


async def _begin(request: web.Request) -> tuple[Gateway, Principal]:
    gateway = request.app[GATEWAY]
    gateway.check_engine()
    principal: Principal = request[PRINCIPAL]
    record = request[RECORD]
    record.principal_id = principal.id
    record.tier = gateway.tier_of(principal)[0]
    gateway.refuse_early(principal, record.tier)  # a caller out of requests: 429 before reading
    return gateway, principal


async def _body(request: web.Request, gateway: Gateway) -> bytes:
    server = gateway.config.server
    return await read_json_body(
        request, int(server.max_body_bytes), server.body_read_timeout_seconds
    )


async def _parse(raw: bytes, gateway: Gateway) -> dict[str, Any]:
    return await parse_json_body(raw, JSONLimits.of(gateway.config.server))


def _note_model(request: web.Request, served: ServedModel) -> None:
    record = request[RECORD]
    record.model, record.root_model = served.name, served.root


def _on_model(job: Job, served: ServedModel) -> Job:
    """The job on the served model's LoRA adapter, if it names one (its response keeps the
    name the request gave, as `job.model`)."""
    if served.adapter is not None:
        job.options = dataclasses.replace(job.options, adapter=served.adapter)
    return job


def _job(request: web.Request, gateway: Gateway, principal: Principal,
         params: ChatCompletionRequest | CompletionRequest,
         prompt: Prompt, *, chat: bool) -> Job:  # fmt: skip
    tier_name, tier = gateway.tier_of(principal)
    request[RECORD].tier = tier_name
    default_max = gateway.default_max_tokens(tier_name, principal)
    options = gateway.sampling_options(params, prompt, tier, params.output_limit, default_max)
    deadline = request_deadline(
        request.headers.get(REQUEST_TIMEOUT_HEADER),
        gateway.config.queue.default_timeout_seconds,
        asyncio.get_running_loop().time(),
    )
    return Job(
        deadline=deadline,
        chat=chat,
        response_id=objects.new_id("chatcmpl-" if chat else "cmpl-"),
        model=params.model,
        prompt=prompt,
        options=options,
        principal=principal,
        tier=tier_name,
        root_model=request[RECORD].root_model,
        stream=bool(params.stream),
        include_usage=params.include_usage,
    )
