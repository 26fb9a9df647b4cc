"""API keys and JWT revocations in a real Redis: one round trip per decision, writes from
several replicas that never lose a revocation, and what the authenticator does while Redis is
down (recent decisions kept; anything else a 503 `auth_unavailable`, never a 401)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from pydantic import SecretStr

from llmserve.auth.authenticator import Authenticator
from llmserve.auth.keys import JwtRevocation, KeyStoreUnavailable
from llmserve.auth.redis_store import RedisKeyStore
from llmserve.auth.store import key_store_from_url
from llmserve.clock import ManualClock
from llmserve.config import AuthConfig, JwtConfig
from llmserve.errors import AuthenticationFailed, ServiceUnavailable
from llmserve.limits.stores.resp import RespClient
from tests.support.redis_server import RedisServer, start_or_skip

pytestmark = pytest.mark.redis
_prefixes = itertools.count()
SECRET = "redis-store-test-secret-" + "k" * 32


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """One server per test: some of these tests kill it."""
    server = start_or_skip(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture
def prefix() -> str:
    return f"t{next(_prefixes)}:"


@pytest.fixture
async def store(redis_server: RedisServer, prefix: str) -> AsyncIterator[RedisKeyStore]:
    opened = RedisKeyStore.from_url(redis_server.url, key_prefix=prefix)
    yield opened
    await opened.close()


class RoundTrips:
    """Counts the client's round trips (`call`, `call_many` and `evalsha` each write once)."""

    def __init__(self, client: RespClient, monkeypatch: pytest.MonkeyPatch) -> None:
        self.commands: list[str] = []
        call, call_many = client.call, client.call_many

        async def counted_call(*args: Any) -> Any:
            self.commands.append(str(args[0]).upper())
            return await call(*args)

        async def counted_call_many(commands: Any) -> Any:
            self.commands.append("+".join(str(c[0]).upper() for c in commands))
            return await call_many(commands)

        monkeypatch.setattr(client, "call", counted_call)
        monkeypatch.setattr(client, "call_many", counted_call_many)


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def token(sub: str, *, iat: float | None = None, jti: str | None = None) -> str:
    issued = int(time.time() if iat is None else iat)
    claims: dict[str, Any] = {"sub": sub, "iat": issued, "exp": issued + 3600}
    if jti is not None:
        claims["jti"] = jti
    return jwt.encode(claims, SECRET, algorithm="HS256")


def auth_config(**overrides: Any) -> AuthConfig:
    jwt_config = JwtConfig(algorithms=["HS256"], secret=SecretStr(SECRET), leeway_seconds=0)
    return AuthConfig(**{"cache_seconds": 0.5, "jwt": jwt_config, **overrides})


async def refusal(auth: Authenticator, headers: dict[str, str]) -> tuple[int, str | None]:
    with pytest.raises((AuthenticationFailed, ServiceUnavailable)) as info:
        await auth.authenticate(headers)
    return info.value.status, info.value.code


# -- the store ------------------------------------------------------------------------------------


async def test_key_and_jwt_decisions_are_one_round_trip_each(
    store: RedisKeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, api_key = await store.create("svc")
    await store.client.ping()  # connected: the counts below are the calls' own
    trips = RoundTrips(store.client, monkeypatch)
    assert await store.lookup(api_key) is not None
    assert trips.commands == ["HGET"]
    assert await store.jwt_revocations("alice", "tok-1") == []
    assert trips.commands == ["HGET", "HMGET"]

    auth = Authenticator(auth_config(), store, ManualClock(100.0))
    for _ in range(20):  # cached after the first of each
        await auth.authenticate(bearer(api_key))
        await auth.authenticate(bearer(token("alice")))
    assert trips.commands == ["HGET", "HMGET", "HGET", "HMGET"]


async def test_concurrent_requests_with_one_uncached_key_share_one_read(
    store: RedisKeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, api_key = await store.create("svc")
    await store.client.ping()
    trips = RoundTrips(store.client, monkeypatch)
    auth = Authenticator(auth_config(), store, ManualClock(100.0))
    principals = await asyncio.gather(*(auth.authenticate(bearer(api_key)) for _ in range(50)))
    assert len({p.id for p in principals}) == 1
    assert trips.commands == ["HGET"]


async def test_revocations_and_rotations_racing_from_two_replicas_never_lose_a_revocation(
    redis_server: RedisServer, prefix: str
) -> None:
    a = RedisKeyStore.from_url(redis_server.url, key_prefix=prefix)
    b = RedisKeyStore.from_url(redis_server.url, key_prefix=prefix)
    try:
        records = [(await a.create(f"k{i}"))[0] for i in range(20)]
        # Each key rotated (on one connection) while revoked (on another), at the same moment.
        rotations, _ = await asyncio.gather(
            asyncio.gather(*(a.rotate(r.id) for r in records)),
            asyncio.gather(*(b.revoke(r.id) for r in records)),
        )
        rotated = {record.id: key for record, key in rotations}
        for record in records:
            final = await a.get(record.id)
            assert final.revoked is not None  # the revocation survived the rotation's write
            found = await b.lookup(rotated[record.id])
            assert found is not None and found.revoked is not None  # and so did the new hash
    finally:
        await a.close()
        await b.close()


async def test_stores_with_different_key_prefixes_are_apart(redis_server: RedisServer) -> None:
    one = key_store_from_url(redis_server.url + "?key_prefix=one:")
    two = key_store_from_url(redis_server.url + "?key_prefix=two:")
    try:
        _, api_key = await one.create("svc")
        assert await two.lookup(api_key) is None and await two.list_keys() == []
        assert len(await one.list_keys()) == 1
    finally:
        await one.close()
        await two.close()


async def test_a_dead_redis_raises_key_store_unavailable_and_a_restarted_one_answers(
    redis_server: RedisServer, store: RedisKeyStore
) -> None:
    _, api_key = await store.create("svc")
    redis_server.stop()
    for call in (
        store.lookup(api_key),
        store.jwt_revocations("alice", None),
        store.create("other"),
        store.list_keys(),
        store.revoke_jwt(JwtRevocation("sub", "a", 1.0, time.time() + 60)),
    ):
        with pytest.raises(KeyStoreUnavailable) as info:
            await call
        assert redis_server.url.split("//")[1].split("/")[0] in str(info.value)
    redis_server.start()  # no persistence in tests: empty, but reachable again
    assert await store.lookup(api_key) is None


async def test_persistence_warning_names_the_risk(store: RedisKeyStore) -> None:
    warning = await store.persistence_warning()  # the test server runs without persistence
    assert warning is not None and "auth.keys" in warning and "appendonly" in warning


# -- the authenticator on Redis -------------------------------------------------------------------


async def test_revoked_jwt_subject_and_token_id_are_refused_within_the_cache_time(
    store: RedisKeyStore,
) -> None:
    clock = ManualClock(100.0)
    auth = Authenticator(auth_config(), store, clock)
    now = time.time()
    alice, alice_tok, bob = token("alice", iat=now - 10), token("carol", jti="tok-9"), token("bob")
    for credential in (alice, alice_tok, bob):
        await auth.authenticate(bearer(credential))

    await store.revoke_jwt(JwtRevocation("sub", "alice", now - 5, now + 3600))
    await store.revoke_jwt(JwtRevocation("jti", "tok-9", now, now + 3600))
    clock.now += 0.49
    assert (await auth.authenticate(bearer(alice))).id == "jwt:alice"  # still cached
    clock.now += 0.01
    assert await refusal(auth, bearer(alice)) == (401, "token_revoked")
    assert await refusal(auth, bearer(alice_tok)) == (401, "token_revoked")
    assert (await auth.authenticate(bearer(bob))).id == "jwt:bob"
    assert (await auth.authenticate(bearer(token("carol", jti="tok-10")))).id == "jwt:carol"
    # alice signing in again after the revocation gets a token that works
    assert (await auth.authenticate(bearer(token("alice", iat=now - 2)))).id == "jwt:alice"


async def test_dead_redis_keeps_recent_decisions_and_answers_503_for_the_rest(
    redis_server: RedisServer, store: RedisKeyStore
) -> None:
    record, known = await store.create("svc")
    _, refused_before = await store.create("gone")
    await store.revoke(parse_id(refused_before))
    never_seen_key = (await store.create("later"))[1]
    clock = ManualClock(100.0)
    auth = Authenticator(auth_config(stale_if_error_seconds=30), store, clock)
    seen_token = token("alice")
    assert (await auth.authenticate(bearer(known))).id == record.id
    assert (await auth.authenticate(bearer(seen_token))).id == "jwt:alice"
    assert await refusal(auth, bearer(refused_before)) == (401, "invalid_api_key")

    redis_server.stop()
    clock.now += 0.5  # every decision above has aged out of the cache
    assert (await auth.authenticate(bearer(known))).id == record.id  # kept: decided recently
    assert (await auth.authenticate(bearer(seen_token))).id == "jwt:alice"
    assert await refusal(auth, bearer(refused_before)) == (401, "invalid_api_key")
    with pytest.raises(ServiceUnavailable) as info:
        await auth.authenticate(bearer(never_seen_key))  # a real key this replica never saw
    assert (info.value.status, info.value.code) == (503, "auth_unavailable")
    assert info.value.headers["Retry-After"] == "1"
    assert await refusal(auth, bearer(token("bob"))) == (503, "auth_unavailable")
    # What needs no store is still answered exactly.
    assert await refusal(auth, bearer("sk-llms-short")) == (401, "invalid_api_key")
    assert await refusal(auth, bearer("x.y.z")) == (401, "invalid_token")

    clock.now += 30.0  # past auth.stale_if_error_seconds: nothing is vouched for any more
    assert await refusal(auth, bearer(known)) == (503, "auth_unavailable")
    assert await refusal(auth, bearer(seen_token)) == (503, "auth_unavailable")

    redis_server.start()  # back, empty (no persistence here): the store's answer counts again
    clock.now += 1.0  # the breaker lets the store be asked again
    assert await refusal(auth, bearer(known)) == (401, "invalid_api_key")


async def test_stale_if_error_zero_refuses_with_503_as_soon_as_the_cache_ages_out(
    redis_server: RedisServer, store: RedisKeyStore
) -> None:
    _, known = await store.create("svc")
    clock = ManualClock(100.0)
    auth = Authenticator(auth_config(stale_if_error_seconds=0), store, clock)
    await auth.authenticate(bearer(known))
    redis_server.stop()
    clock.now += 0.49
    await auth.authenticate(bearer(known))  # still cached
    clock.now += 0.01
    assert await refusal(auth, bearer(known)) == (503, "auth_unavailable")


async def test_last_use_times_the_store_could_not_take_are_written_later(
    redis_server: RedisServer, store: RedisKeyStore
) -> None:
    record, known = await store.create("svc")
    wall = ManualClock(5_000.0)
    auth = Authenticator(auth_config(), store, ManualClock(100.0), wall_clock=wall)
    await auth.authenticate(bearer(known))
    redis_server.stop()
    await auth.flush_last_used()  # fails: kept for the next flush
    redis_server.start()
    await store.put_records([record])  # the restarted Redis is empty: put the record back
    await auth.close()
    assert (await store.get(record.id)).last_used == 5_000.0


def parse_id(api_key: str) -> str:
    return api_key.split("-")[2]
