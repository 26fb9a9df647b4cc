"""The Authenticator: header parsing, caching with an injected clock, revocation, last use."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from llmserve.auth.authenticator import ANONYMOUS_ADMIN, LAST_USED_FLUSH_SECONDS, Authenticator
from llmserve.auth.keys import KeyRecord, KeyStore
from llmserve.auth.store import DirKeyStore
from llmserve.clock import ManualClock
from llmserve.config import AuthConfig
from llmserve.errors import AuthenticationFailed


class CountingStore(DirKeyStore):
    """Wraps a real store and counts the reads that reach it."""

    def __init__(self, store: KeyStore) -> None:
        super().__init__(store)
        self.lookups = 0
        self.touched: list[dict[str, float]] = []

    async def lookup(self, api_key: str) -> KeyRecord | None:
        self.lookups += 1
        return await super().lookup(api_key)

    async def touch(self, last_used: dict[str, float]) -> None:
        self.touched.append(dict(last_used))
        await super().touch(last_used)


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    with KeyStore(tmp_path / "keys") as opened:
        yield opened


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


async def code_of(auth: Authenticator, headers: dict[str, str]) -> str | None:
    with pytest.raises(AuthenticationFailed) as info:
        await auth.authenticate(headers)
    return info.value.code


async def test_key_yields_its_principal(store: KeyStore) -> None:
    record, api_key = store.create("svc", tier="pro", models=["m"], admin=True,
                                   limits={"tokens_per_minute": 7})  # fmt: skip
    auth = Authenticator(AuthConfig(keys=store.directory), store)
    for headers in (
        bearer(api_key),
        {"X-API-Key": api_key},
        {"Authorization": f"bearer {api_key}"},
    ):
        p = await auth.authenticate(headers)
        assert (p.id, p.tier, p.models, p.kind, p.admin, p.limit_overrides) == (
            record.id, "pro", frozenset({"m"}), "key", True, {"tokens_per_minute": 7}
        )  # fmt: skip


async def test_header_mistakes_get_helpful_codes(store: KeyStore) -> None:
    auth = Authenticator(AuthConfig(keys=store.directory), store)
    assert await code_of(auth, {}) == "missing_api_key"
    assert await code_of(auth, {"Authorization": ""}) == "missing_api_key"
    assert await code_of(auth, {"Authorization": "Bearer   "}) == "missing_api_key"
    basic = {"Authorization": "Basic dXNlcjpwYXNz"}
    assert await code_of(auth, basic) == "invalid_authorization_header"
    assert await code_of(auth, bearer("a.b.c")) == "invalid_token"  # JWTs not configured
    assert await code_of(auth, bearer("x" * 100_000)) == "invalid_api_key"


async def test_hot_key_is_served_from_memory_within_cache_seconds(store: KeyStore) -> None:
    _, api_key = store.create("svc")
    counting, clock = CountingStore(store), ManualClock(100.0)
    auth = Authenticator(AuthConfig(keys=store.directory, cache_seconds=0.5), counting, clock)
    for _ in range(100):
        await auth.authenticate(bearer(api_key))
    assert counting.lookups == 1
    clock.now += 0.5
    await auth.authenticate(bearer(api_key))
    assert counting.lookups == 2


async def test_refusals_are_cached_too(store: KeyStore) -> None:
    counting = CountingStore(store)
    auth = Authenticator(AuthConfig(keys=store.directory), counting, ManualClock(100.0))
    unknown = "sk-llms-000000000000-" + "x" * 43
    for _ in range(10):
        assert await code_of(auth, bearer(unknown)) == "invalid_api_key"
    assert counting.lookups == 1


async def test_revoked_key_is_refused_once_the_cache_entry_ages_out(tmp_path: Path) -> None:
    clock = ManualClock(100.0)
    with KeyStore(tmp_path / "keys") as server_side, KeyStore(tmp_path / "keys") as cli_side:
        record, api_key = cli_side.create("svc")
        auth = Authenticator(AuthConfig(keys=tmp_path, cache_seconds=1.0), server_side, clock)
        await auth.authenticate(bearer(api_key))
        cli_side.revoke(record.id)
        clock.now += 0.999
        await auth.authenticate(bearer(api_key))  # still inside the cached second
        clock.now += 0.001
        assert await code_of(auth, bearer(api_key)) == "invalid_api_key"


async def test_rotated_key_old_secret_stops_and_new_one_works(store: KeyStore) -> None:
    clock = ManualClock(100.0)
    record, old = store.create("svc")
    auth = Authenticator(AuthConfig(keys=store.directory, cache_seconds=0.5), store, clock)
    await auth.authenticate(bearer(old))
    _, new = store.rotate(record.id)
    clock.now += 0.5
    assert await code_of(auth, bearer(old)) == "invalid_api_key"
    assert (await auth.authenticate(bearer(new))).id == record.id


async def test_expired_key_says_expired_even_when_it_expires_while_cached(store: KeyStore) -> None:
    wall = ManualClock(100.0)
    wall.now = 1_000.0
    _, api_key = store.create("svc", expires=1_010.0)
    auth = Authenticator(AuthConfig(keys=store.directory, cache_seconds=1.0), store,
                         ManualClock(100.0), wall_clock=wall)  # fmt: skip
    await auth.authenticate(bearer(api_key))
    wall.now = 1_010.0
    assert await code_of(auth, bearer(api_key)) == "api_key_expired"


async def test_unknown_and_revoked_keys_get_the_same_answer(store: KeyStore) -> None:
    record, api_key = store.create("svc")
    store.revoke(record.id)
    auth = Authenticator(AuthConfig(keys=store.directory), store)
    unknown = f"sk-llms-{record.id}-" + "y" * 43
    answers = []
    for credential in (api_key, unknown, "sk-llms-abcdefabcdef-" + "z" * 43):
        with pytest.raises(AuthenticationFailed) as info:
            await auth.authenticate(bearer(credential))
        answers.append((info.value.code, info.value.message, info.value.headers))
    assert answers[0] == answers[1] == answers[2]


async def test_last_used_is_batched_and_flushed(store: KeyStore) -> None:
    record, api_key = store.create("svc")
    counting, clock = CountingStore(store), ManualClock(100.0)
    wall = ManualClock(100.0)
    auth = Authenticator(AuthConfig(keys=store.directory), counting, clock, wall_clock=wall)
    await auth.authenticate(bearer(api_key))
    assert counting.touched == []  # no write on the request path
    clock.now += LAST_USED_FLUSH_SECONDS
    wall.now = 555.0
    await auth.authenticate(bearer(api_key))
    assert counting.touched == []  # written off the request path, by a task of its own
    await asyncio.sleep(0)
    assert counting.touched == [{record.id: 555.0}]
    wall.now = 556.0
    await auth.authenticate(bearer(api_key))
    await auth.close()
    assert store.get(record.id).last_used == 556.0


async def test_disabled_auth_gives_everyone_an_anonymous_admin() -> None:
    auth = Authenticator(AuthConfig(enabled=False), None)
    assert await auth.authenticate({}) is ANONYMOUS_ADMIN
    assert ANONYMOUS_ADMIN.admin and ANONYMOUS_ADMIN.models is None


async def test_cache_is_bounded_under_a_spray_of_random_credentials(store: KeyStore) -> None:
    from llmserve.auth import authenticator as module

    auth = Authenticator(AuthConfig(keys=store.directory), store, ManualClock(100.0))
    for i in range(module.CACHE_MAX_ENTRIES + 5):
        with pytest.raises(AuthenticationFailed):
            await auth.authenticate(bearer(f"garbage{i}"))
    assert len(auth._cache) <= module.CACHE_MAX_ENTRIES
