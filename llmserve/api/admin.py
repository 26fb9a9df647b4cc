"""Operator routes (an admin credential on the public port; anyone who reaches the admin
listener): POST /admin/reload, and LoRA adapters at run time (engine/served.py):

    POST /admin/models/load    {"name": "sql", "path": "/srv/adapters/sql"}
    POST /admin/models/unload  {"name": "sql"}

and the same in vLLM's own request shapes, for scripts written against `vllm serve`:
POST /v1/load_lora_adapter {"lora_name", "lora_path"} and /v1/unload_lora_adapter
{"lora_name"}, answering as vLLM does (a line of text; errors as JSON)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from llmserve.api import objects
from llmserve.app_state import GATEWAY, RELOADER
from llmserve.errors import InvalidRequest, NotFound

# HTTP status of each reload result: the file is wrong (invalid), or asks for a restart
_STATUS = {"applied": 200, "unchanged": 200, "invalid": 422, "refused": 409}


async def reload(request: web.Request) -> web.Response:
    """Read the config file again and apply what can change without a restart
    (server/reload.py); the body says what happened."""
    reloader = request.app.get(RELOADER)
    if reloader is None:
        raise NotFound("This server cannot reload its config (not started by `llmserve up`).")
    result = await reloader.reload()
    return objects.json_response(result.as_json(), status=_STATUS[result.outcome])


async def load_model(request: web.Request) -> web.Response:
    """Load the LoRA adapter at `path` and serve it as the model `name`."""
    body = await _json_object(request)
    name, path = _text(body, "name"), _text(body, "path")
    loaded = await request.app[GATEWAY].models.load(name, path)
    message = f"serving adapter '{name}' from {loaded}"
    return objects.json_response(
        {"result": "loaded", "model": name, "path": loaded, "message": message}
    )


async def unload_model(request: web.Request) -> web.Response:
    """Stop serving the adapter `name`; requests in flight on it finish first."""
    name = _text(await _json_object(request), "name")
    in_flight = await request.app[GATEWAY].models.unload(name)
    return objects.json_response({"result": "unloaded", "model": name, "in_flight": in_flight,
                                  "message": _unloaded(name, in_flight)})  # fmt: skip


async def load_lora_adapter(request: web.Request) -> web.Response:
    """vLLM's POST /v1/load_lora_adapter."""
    body = await _json_object(request)
    if body.get("load_inplace"):
        raise InvalidRequest("load_inplace is not supported: unload the adapter, then load it.",
                             param="load_inplace")  # fmt: skip
    name = _text(body, "lora_name")
    await request.app[GATEWAY].models.load(name, _text(body, "lora_path"))
    return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")


async def unload_lora_adapter(request: web.Request) -> web.Response:
    """vLLM's POST /v1/unload_lora_adapter (`lora_int_id` is ignored: names are unique)."""
    name = _text(await _json_object(request), "lora_name")
    await request.app[GATEWAY].models.unload(name)
    return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")


def _unloaded(name: str, in_flight: int) -> str:
    if not in_flight:
        return f"adapter '{name}' unloaded"
    return f"adapter '{name}' unloaded; {in_flight} request(s) in flight finish on it first"


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read() or b"{}")
    except ValueError:
        raise InvalidRequest("The body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The body must be a JSON object.")
    return body


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(f"Missing required parameter: '{key}' (a string).", param=key)
    return value
