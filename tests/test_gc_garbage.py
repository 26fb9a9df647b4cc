"""The request paths make no reference cycles: with the collector's young passes tuned down
(server/heap.py), cyclic garbage would pile up between passes and make each pass long."""

from __future__ import annotations

import gc
from collections.abc import Awaitable, Callable

import pytest

from llmserve.auth.authenticator import Authenticator
from llmserve.auth.keys import KeyStore
from llmserve.engine.fake import FakeEngine
from llmserve.limits import Limiter, store_from_url
from llmserve.middleware.auth import auth_middleware
from tests.support.api import chat_body, make_config

ROUNDS = 50


@pytest.fixture
def collector_off():
    gc.collect()
    gc.disable()
    yield
    gc.enable()


async def garbage_per_request(send: Callable[[], Awaitable[int]], expected: int) -> float:
    for _ in range(5):  # warm caches (auth decisions, plans) first
        await send()
    gc.collect()
    statuses = [await send() for _ in range(ROUNDS)]
    assert statuses == [expected] * ROUNDS
    return gc.collect() / ROUNDS


@pytest.mark.parametrize(
    "kind, expected",
    [("ok", 200), ("stream", 200), ("bad_key", 401), ("limited", 429), ("bad_json", 400),
     ("unknown_model", 404)],
)  # fmt: skip
async def test_no_reference_cycles_per_request(app_client, tmp_path, collector_off, kind, expected):
    config = make_config(tmp_path, auth={"enabled": True}, limits={
        "default_tier": "t", "tiers": {"t": {"requests_per_minute": 10_000}, "one": {
            "requests_per_minute": 1}}})  # fmt: skip
    limiter = Limiter(config.limits, store_from_url("memory://", tmp_path / "l"))
    with KeyStore(tmp_path / "keys") as keys:
        _, key = keys.create("a")
        _, limited = keys.create("b", tier="one")
        auth = auth_middleware(Authenticator(config.auth, keys), config.server)
        client = await app_client(config, FakeEngine("fake", 256), limiter=limiter,
                                  auth_middleware=auth)  # fmt: skip
        bodies = {"stream": chat_body(max_tokens=3, stream=True),
                  "unknown_model": chat_body(model="nope")}  # fmt: skip
        credential = {"bad_key": "sk-llms-forged", "limited": limited}.get(kind, key)

        async def send() -> int:
            headers = {"Authorization": f"Bearer {credential}", "Content-Type": "application/json"}
            if kind == "bad_json":
                resp = await client.post("/v1/chat/completions", data=b"{oops", headers=headers)
            else:
                body = bodies.get(kind, chat_body(max_tokens=3))
                resp = await client.post("/v1/chat/completions", json=body, headers=headers)
            await resp.read()
            return resp.status

        if kind == "limited":
            await send()  # its one request of the minute
        # the test client's own requests make a little garbage: one object per request at most
        garbage = await garbage_per_request(send, expected)
        assert garbage < 1.0
    await limiter.close()


async def test_no_reference_cycles_when_streams_end_badly(app_client, tmp_path, collector_off):
    """A client that goes away mid-stream, and an engine that fails mid-stream."""
    config = make_config(tmp_path, engine={"max_model_len": 100_000})
    engine = FakeEngine("fake", 100_000, tokens_per_second=200)
    client = await app_client(config, engine)

    async def vanish() -> int:
        resp = await client.post("/v1/chat/completions",
                                 json=chat_body(max_tokens=1000, stream=True))  # fmt: skip
        await resp.content.readline()
        resp.close()  # the client hangs up after the first event
        await _until(lambda: engine.running == 0)
        return resp.status

    # A hang-up leaves 14 objects: the in-process test client's and server's asyncio selector
    # transports (uvloop's, which serve in production, make none). A cycle through the
    # request's frames, as a re-raise from a local makes, is ~100 objects.
    assert await garbage_per_request(vanish, 200) < 20

    engine.fail_after_tokens = 2

    async def failing() -> int:
        resp = await client.post("/v1/chat/completions",
                                 json=chat_body(max_tokens=10, stream=True))  # fmt: skip
        body = await resp.read()
        assert b'"engine_error"' in body
        return resp.status

    assert await garbage_per_request(failing, 200) < 1.0


async def _until(condition: Callable[[], bool]) -> None:
    import asyncio

    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.002)
    raise AssertionError("condition never held")
