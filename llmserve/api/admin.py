"""Operator routes: POST /admin/reload (an admin credential on the public port; anyone who
reaches the admin listener)."""

from __future__ import annotations

from aiohttp import web

from llmserve.api import objects
from llmserve.app_state import RELOADER
from llmserve.errors import NotFound

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
