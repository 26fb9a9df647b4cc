"""POST /v1/chat/completions and POST /v1/completions."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from llmserve.admission.deadline import REQUEST_TIMEOUT_HEADER, request_deadline
from llmserve.api import objects
from llmserve.api.body import read_json_body
from llmserve.api.gateway import Gateway, Job
from llmserve.api.schemas import ChatCompletionRequest, CompletionRequest, parse_request
from llmserve.auth.principal import Principal
from llmserve.engine.base import Prompt
from llmserve.request_state import PRINCIPAL, RECORD
from llmserve.server.keys import GATEWAY


async def chat_completions(request: web.Request) -> web.StreamResponse:
    gateway, principal = await _begin(request)
    params = parse_request(ChatCompletionRequest, await _body(request, gateway))
    gateway.check_model(params.model, principal)
    _note_model(request, params.model)  # after the check: only a real model name is recorded
    prompt = await gateway.engine.render_chat(params.messages)
    return await gateway.run(request, _job(request, gateway, principal, params, prompt, chat=True))


async def completions(request: web.Request) -> web.StreamResponse:
    gateway, principal = await _begin(request)
    params = parse_request(CompletionRequest, await _body(request, gateway))
    gateway.check_model(params.model, principal)
    _note_model(request, params.model)  # after the check: only a real model name is recorded
    prompt = await gateway.engine.render_completion(params.prompt_text)
    return await gateway.run(request, _job(request, gateway, principal, params, prompt, chat=False))


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
    return await read_json_body(request, int(gateway.config.server.max_body_bytes))


def _note_model(request: web.Request, model: str) -> None:
    request[RECORD].model = model


def _job(request: web.Request, gateway: Gateway, principal: Principal, params: Any,
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
        stream=bool(params.stream),
        include_usage=params.include_usage,
    )
