"""The key store seam (KeyStoreBackend): the same behaviour from the directory store and from
Redis (a real server), and `key_store_from_url` choosing between them by `auth.keys`."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from llmserve.auth.keys import (
    ID_HEX_DIGITS,
    KEY_PREFIX,
    JwtRevocation,
    KeyNotFound,
    KeyStore,
    hash_key,
    parse_key_id,
)
from llmserve.auth.redis_store import RedisKeyStore
from llmserve.auth.store import DirKeyStore, KeyStoreBackend, key_store_from_url
from llmserve.clock import ManualClock
from llmserve.config import parse_config
from llmserve.errors import ConfigError
from llmserve.limits.stores.resp import RespClient
from tests.support.redis_server import RedisServer, start_or_skip

_prefixes = itertools.count()
T0 = 1_000_000.0


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_or_skip(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture(params=["dir", pytest.param("redis", marks=pytest.mark.redis)])
def backend_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class World:
    """Two handles on one store (a server and a CLI, or two replicas) and its clock."""

    def __init__(self, a: KeyStoreBackend, b: KeyStoreBackend, clock: ManualClock) -> None:
        self.a, self.b, self.clock = a, b, clock

    async def raw_bytes(self) -> bytes:
        """Everything the store holds, as bytes (to look for secrets)."""
        if isinstance(self.a, DirKeyStore):
            files = sorted(p for p in self.a.store.directory.rglob("*") if p.is_file())
            return b"".join(p.read_bytes() for p in files)
        assert isinstance(self.a, RedisKeyStore)
        client = self.a.client
        keys = await client.call("KEYS", "*")
        dumped = [await client.call("HGETALL", k) for k in keys]
        return b"".join(bytes(k) for k in keys) + b"".join(b"".join(d) for d in dumped)


@pytest.fixture
async def world(
    backend_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[World]:
    clock = ManualClock(T0)
    if backend_kind == "dir":
        a = DirKeyStore(KeyStore(tmp_path / "keys", now=clock))
        b = DirKeyStore(KeyStore(tmp_path / "keys", now=clock))
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        prefix = f"t{next(_prefixes)}:"
        a = RedisKeyStore(RespClient.from_url(server.url), prefix, now=clock)
        b = RedisKeyStore(RespClient.from_url(server.url), prefix, now=clock)
    yield World(a, b, clock)
    await a.close()
    await b.close()


async def test_created_key_is_found_through_another_handle_and_only_its_hash_is_stored(
    world: World,
) -> None:
    record, api_key = await world.a.create(
        "svc", tier="pro", models=["m1", "m2"], expires=T0 + 60, admin=True,
        limits={"tokens_per_minute": 7},
    )  # fmt: skip
    assert api_key.startswith(f"{KEY_PREFIX}{record.id}-") and parse_key_id(api_key) == record.id
    assert len(record.id) == ID_HEX_DIGITS and record.key_hash == hash_key(api_key)
    assert await world.b.lookup(api_key) == record
    assert await world.b.get(record.id) == record
    assert (record.models, record.created, record.limits) == (
        ("m1", "m2"),
        T0,
        {"tokens_per_minute": 7},
    )
    stored = await world.raw_bytes()
    assert api_key.split("-", 3)[3].encode() not in stored  # the secret: never
    assert record.key_hash.encode() in stored  # the hash: really written


async def test_lookup_refuses_wrong_secrets_unknown_ids_and_garbage(world: World) -> None:
    _, api_key = await world.a.create("svc")
    assert await world.b.lookup(api_key[:-1] + ("A" if api_key[-1] != "A" else "B")) is None
    assert await world.b.lookup(f"{KEY_PREFIX}{'0' * ID_HEX_DIGITS}-{'x' * 43}") is None
    assert await world.b.lookup("not-a-key") is None


async def test_revoke_and_rotate_are_seen_by_the_other_handle_at_once(world: World) -> None:
    record, old_key = await world.a.create("svc", tier="pro", limits={"tokens_per_day": 5})
    rotated, new_key = await world.b.rotate(record.id)
    assert await world.a.lookup(old_key) is None
    assert await world.a.lookup(new_key) == rotated
    assert (rotated.id, rotated.tier, rotated.limits) == (record.id, "pro", {"tokens_per_day": 5})
    world.clock.now = T0 + 5
    revoked = await world.a.revoke(record.id)
    assert revoked.revoked == T0 + 5
    assert (await world.b.lookup(new_key)).revoked == T0 + 5  # found, so it can be refused
    world.clock.now = T0 + 9
    assert (await world.b.revoke(record.id)).revoked == T0 + 5  # revoking twice keeps the first


async def test_unknown_ids_raise_key_not_found(world: World) -> None:
    for action in (world.a.get, world.a.revoke, world.a.rotate):
        with pytest.raises(KeyNotFound):
            await action("000000000000")


async def test_list_is_ordered_by_creation_with_last_use_times(world: World) -> None:
    ids = []
    for i, name in enumerate(("a", "b", "c")):
        world.clock.now = T0 + i
        ids.append((await world.a.create(name))[0].id)
    await world.b.touch({ids[1]: T0 + 50})
    listed = await world.a.list_keys()
    assert [r.id for r in listed] == ids
    assert [r.last_used for r in listed] == [None, T0 + 50, None]


async def test_last_use_keeps_the_latest_time_and_never_undoes_a_revocation(world: World) -> None:
    record, _ = await world.a.create("svc")
    await world.a.revoke(record.id)
    await world.b.touch({record.id: T0 + 20})
    await world.a.touch({record.id: T0 + 10})  # another replica's older use arrives later
    after = await world.b.get(record.id)
    assert after.last_used == T0 + 20
    assert after.revoked is not None


async def test_put_records_adds_keeps_or_replaces_by_id(world: World) -> None:
    record, api_key = await world.a.create("svc")
    other, _ = await world.a.create("other")
    renamed = type(record)(**{**record.__dict__, "name": "renamed", "last_used": T0 + 3})
    count = await world.b.put_records([renamed, other])
    assert (count.added, count.replaced, count.kept) == (0, 0, 2)
    assert (await world.a.get(record.id)).name == "svc"
    count = await world.b.put_records([renamed], replace=True)
    assert (count.added, count.replaced, count.kept) == (0, 1, 0)
    assert (await world.a.get(record.id)).name == "renamed"
    assert (await world.a.get(record.id)).last_used == T0 + 3
    assert (await world.a.lookup(api_key)) is not None  # the hash came along


async def test_jwt_revocations_are_found_merged_and_dropped_at_their_end(world: World) -> None:
    await world.a.revoke_jwt(JwtRevocation("sub", "alice", T0, T0 + 100))
    await world.a.revoke_jwt(JwtRevocation("jti", "tok-1", T0, T0 + 50))
    found = await world.b.jwt_revocations("alice", "tok-1")
    assert sorted(r.field for r in found) == ["jti:tok-1", "sub:alice"]
    assert await world.b.jwt_revocations("bob", None) == []

    # A later revocation of the same subject: the later time and the later end win.
    world.clock.now = T0 + 10
    merged = await world.b.revoke_jwt(JwtRevocation("sub", "alice", T0 + 10, T0 + 60))
    assert (merged.revoked_at, merged.until) == (T0 + 10, T0 + 100)

    world.clock.now = T0 + 50  # tok-1's revocation has ended
    assert [r.field for r in await world.a.jwt_revocations("alice", "tok-1")] == ["sub:alice"]
    assert [r.field for r in await world.a.list_jwt_revocations()] == ["sub:alice"]
    world.clock.now = T0 + 100
    assert await world.a.list_jwt_revocations() == []


async def test_subject_revocation_refuses_tokens_issued_before_it_only() -> None:
    revocation = JwtRevocation("sub", "alice", T0, T0 + 100)
    assert revocation.refuses(T0 - 1) and revocation.refuses(T0) and revocation.refuses(None)
    assert not revocation.refuses(T0 + 1)
    assert revocation.refuses(T0 + 1, leeway=5)  # an identity provider's clock may run ahead
    assert JwtRevocation("jti", "t", T0, T0 + 1).refuses(T0 + 1_000)


# -- choosing the store ---------------------------------------------------------------------------


async def test_auth_keys_chooses_the_store_by_url(tmp_path: Path) -> None:
    directory = key_store_from_url(str(tmp_path / "keys"))
    assert isinstance(directory, DirKeyStore) and (tmp_path / "keys").is_dir()
    await directory.close()
    for url, where in (
        ("redis://:pw@127.0.0.1:7000/2?socket_timeout=0.2&key_prefix=x:", "127.0.0.1:7000"),
        ("rediss://h.example:6380/0", "h.example:6380"),
        ("unix:///run/redis.sock?db=3", "/run/redis.sock"),
    ):
        store = key_store_from_url(url)
        assert isinstance(store, RedisKeyStore) and store.client.options.where == where
        assert "pw" not in store.where
        await store.close()
    store = key_store_from_url("redis://127.0.0.1:7000/2?socket_timeout=0.2&key_prefix=x:")
    assert isinstance(store, RedisKeyStore)
    assert store.client.options.socket_timeout == 0.2 and store.client.options.db == 2
    assert store._keys == "x:keys"
    await store.close()


def test_a_bad_auth_keys_url_fails_when_the_config_loads_without_its_password() -> None:
    for text, message in (
        ("auth: {keys: 'memcached://h'}", "unknown key store"),
        ("auth: {keys: 'redis://:hunter2@h/notanumber'}", "database must be a number"),
        ("auth: {keys: 'redis://h/0?pool=3'}", "not supported"),
    ):
        with pytest.raises(ConfigError) as info:
            parse_config(text)
        assert "auth.keys" in str(info.value) and message in str(info.value)
        assert "hunter2" not in str(info.value)
    assert parse_config("auth: {keys: 'redis://h:1/0?key_prefix=a:'}").auth.keys == (
        "redis://h:1/0?key_prefix=a:"
    )


def test_llmserve_check_shows_a_redis_key_store_without_its_password() -> None:
    from llmserve.config import effective_config

    config = parse_config("auth: {keys: 'redis://user:hunter2@h:1/0'}")
    assert effective_config(config)["auth"]["keys"] == "redis://user:****@h:1/0"
