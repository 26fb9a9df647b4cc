"""The restricted Redis user of docs/limits.md: its rule, copied from the docs, is enough for
every operation of the limiter and the key store, and refuses what they do not need."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from llmserve.limits.stores.redis import RedisStore
from llmserve.limits.stores.resp import RespClient, RespError
from tests.support.redis_server import (
    ACL_PASSWORD,
    ACL_USER,
    RedisServer,
    create_acl_user,
    ok,
    start_or_skip,
)
from tests.support.redis_workout import key_store_workout, limiter_workout

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_or_skip(tmp_path_factory.mktemp("acl"))
    create_acl_user(server.port)
    yield server
    server.stop()


def user_url(server: RedisServer, db: int = 0) -> str:
    return f"redis://{ACL_USER}:{ACL_PASSWORD}@127.0.0.1:{server.port}/{db}"


async def test_the_documented_acl_rule_is_enough_for_the_limiter(server: RedisServer) -> None:
    async def flush_scripts() -> None:  # as the default user: llmserve's may not
        ok(server.port, "SCRIPT", "FLUSH")

    await limiter_workout(user_url(server), flush_scripts=flush_scripts)
    await limiter_workout(user_url(server, db=3))  # SELECT


async def test_the_documented_acl_rule_is_enough_for_the_key_store(server: RedisServer) -> None:
    await key_store_workout(user_url(server))


async def test_the_documented_acl_rule_refuses_the_rest(server: RedisServer) -> None:
    client = RespClient.from_url(user_url(server))
    try:
        assert await client.ping() == "PONG"
        for command in [("FLUSHALL",), ("KEYS", "*"), ("GET", "other:key"), ("DEL", "llmserve:x"),
                        ("CONFIG", "GET", "requirepass"), ("EVAL", "return 1", 0)]:  # fmt: skip
            with pytest.raises(RespError, match="NOPERM"):
                await client.call(*command)
        # a script runs with the caller's rights: other keys, other commands are refused
        for script in ("return redis.call('GET', 'other:key')",
                       "return redis.call('DEL', 'llmserve:x')"):  # fmt: skip
            ok(server.port, "SCRIPT", "LOAD", script)
            with pytest.raises(RespError, match=r"can't (access|run)"):
                await client.call("EVALSHA", _sha1(script), 0)
    finally:
        await client.close()
    store = RedisStore.from_url(user_url(server))
    try:  # CONFIG GET is not granted: no persistence warning, and no failure either
        assert await store.persistence_warning() is None
    finally:
        await store.close()


def _sha1(text: str) -> str:
    import hashlib

    return hashlib.sha1(text.encode()).hexdigest()


def test_the_rule_is_in_the_docs_once() -> None:
    docs = (Path(__file__).resolve().parents[1] / "docs" / "limits.md").read_text()
    assert docs.count(f"ACL SETUSER {ACL_USER} ") == 1
