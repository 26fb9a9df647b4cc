"""End to end: the official `openai` client against the real app with auth wired in."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from llmserve.auth.authenticator import Authenticator
from llmserve.auth.keys import KeyStore
from llmserve.config import Config
from llmserve.engine.factory import create_engine
from llmserve.middleware.auth import auth_middleware
from llmserve.server.app import build_app


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config.model_validate(
        {
            "engine": {"kind": "fake", "served_model_name": "fake-model"},
            "auth": {"keys": str(tmp_path / "keys"), "cache_seconds": 1.0},
            "usage": {"ledger": None},
        }
    )


async def test_openai_client_with_valid_then_revoked_key(config: Config, aiohttp_client) -> None:
    now = [0.0]
    with KeyStore(config.auth.keys) as store:
        record, api_key = store.create("sdk-user")
        auth = Authenticator(config.auth, store, clock=lambda: now[0])
        app = build_app(
            config,
            create_engine(config.engine),
            auth_middleware=auth_middleware(auth, config.server),
        )
        server = await aiohttp_client(app)
        client = openai.AsyncOpenAI(
            base_url=str(server.make_url("/v1")), api_key=api_key, max_retries=0
        )
        try:
            models = await client.models.list()
            assert [m.id for m in models.data] == ["fake-model"]
            reply = await client.chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
            assert reply.choices[0].message.content

            store.revoke(record.id)
            now[0] += config.auth.cache_seconds
            with pytest.raises(openai.AuthenticationError) as info:
                await client.models.list()
            assert info.value.status_code == 401
            assert info.value.code == "invalid_api_key"
            assert api_key.split("-", 3)[3] not in str(info.value.body)
        finally:
            await client.close()


async def test_openai_client_without_a_key_is_refused(config: Config, aiohttp_client) -> None:
    with KeyStore(config.auth.keys) as store:
        auth = Authenticator(config.auth, store)
        app = build_app(
            config,
            create_engine(config.engine),
            auth_middleware=auth_middleware(auth, config.server),
        )
        server = await aiohttp_client(app)
        client = openai.AsyncOpenAI(
            base_url=str(server.make_url("/v1")), api_key="sk-llms-not-a-real-key", max_retries=0
        )
        try:
            with pytest.raises(openai.AuthenticationError) as info:
                await client.chat.completions.create(
                    model="fake-model", messages=[{"role": "user", "content": "hi"}]
                )
            assert info.value.code == "invalid_api_key"
        finally:
            await client.close()
