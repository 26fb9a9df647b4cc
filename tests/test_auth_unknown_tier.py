"""A credential naming a tier the config does not define is refused with 403 unknown_tier,
never served on the default tier (which may be more generous)."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from llmserve.auth.principal import Principal
from llmserve.engine.fake import FakeEngine
from llmserve.request_state import PRINCIPAL
from tests.support.api import chat_body, make_config


def principal_on(tier: str | None):  # an auth middleware that says who is calling
    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        request[PRINCIPAL] = Principal(id="k1", tier=tier)
        return await handler(request)

    return auth


async def test_a_key_on_an_undefined_tier_gets_403(app_client, tmp_path):
    config = make_config(tmp_path, limits={"default_tier": "free", "tiers": {"free": {}}})
    engine = FakeEngine("fake", 256)
    client = await app_client(config, engine, auth_middleware=principal_on("gold"))
    response = await client.post("/v1/chat/completions", json=chat_body(max_tokens=2))
    assert response.status == 403
    error = (await response.json())["error"]
    assert error["code"] == "unknown_tier" and "'gold'" in error["message"]
    assert not engine.calls


async def test_a_key_without_a_tier_gets_the_default_one(app_client, tmp_path):
    config = make_config(tmp_path, limits={"default_tier": "free", "tiers": {"free": {}}})
    client = await app_client(config, FakeEngine("fake", 256), auth_middleware=principal_on(None))
    response = await client.post("/v1/chat/completions", json=chat_body(max_tokens=2))
    assert response.status == 200
