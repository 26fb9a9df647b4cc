"""Shared fixtures: a config on temp paths, the fake engine, and an aiohttp test client."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from llmserve.config import Config
from llmserve.engine.fake import FakeEngine
from llmserve.server.app import build_app
from tests.support.api import make_config

ClientFactory = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path)


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(model_name="fake", max_model_len=256)


@pytest.fixture
def app_client(aiohttp_client: Any) -> ClientFactory:
    """Start build_app(config, engine, **extra) under the test client, engine already started."""

    async def start(config: Config, engine: FakeEngine, **extra: Any) -> TestClient:
        app: web.Application = build_app(config, engine, **extra)
        client: TestClient = await aiohttp_client(app)
        await _wait_ready(client)
        return client

    return start


async def _wait_ready(client: TestClient) -> None:
    from llmserve.server.app import ENGINE_START

    await client.app[ENGINE_START]


@pytest.fixture
async def client(app_client: ClientFactory, config: Config, engine: FakeEngine) -> TestClient:
    return await app_client(config, engine)


# In CI (scripts/test sets LLMSERVE_REQUIRE_ALL_TESTS=1) the real engine, Redis and tmux tests must
# run: a skip of one of them is turned into a failure, so a missing install cannot pass silently.
REQUIRED_MARKERS = ("engine", "smollm2", "redis", "tmux")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or not os.environ.get("LLMSERVE_REQUIRE_ALL_TESTS"):
        return
    if any(item.get_closest_marker(name) for name in REQUIRED_MARKERS):
        report.outcome = "failed"
        report.longrepr = f"required test was skipped: {report.longrepr}"
