"""POST /v1/chat/completions and POST /v1/completions."""

from __future__ import annotations

from typing import Any

from aiohttp import web

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
    _note_model(request, params.model)
    gateway.check_model(params.model, principal)
    prompt = await gateway.engine.render_chat(params.messages)
    return await gateway.run(request, _job(request, gateway, principal, params, prompt, chat=True))


async def completions(request: web.Request) -> web.StreamResponse:
    gateway, principal = await _begin(request)
    params = parse_request(CompletionRequest, await _body(request, gateway))
    _note_model(request, params.model)
    gateway.check_model(params.model, principal)
    prompt = await gateway.engine.render_completion(params.prompt_text)
    return await gateway.run(request, _job(request, gateway, principal, params, prompt, chat=False))


async def _begin(request: web.Request) -> tuple[Gateway, Principal]:
    gateway = request.app[GATEWAY]
    gateway.check_engine()
    principal: Principal = request[PRINCIPAL]
    request[RECORD].principal_id = principal.id
    return gateway, principal


async def _body(request: web.Request, gateway: Gateway) -> bytes:
    return await read_json_body(request, int(gateway.config.server.max_body_bytes))


def _note_model(request: web.Request, model: str) -> None:
    request[RECORD].model = model


def _job(request: web.Request, gateway: Gateway, principal: Principal, params: Any,
         prompt: Prompt, *, chat: bool) -> Job:  # fmt: skip
    tier_name, tier = gateway.tier_of(principal)
    request[RECORD].tier = tier_name
    options = gateway.sampling_options(params, prompt, tier, params.output_limit)
    return Job(
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
