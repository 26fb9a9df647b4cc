"""A real Redis Cluster (three masters): each principal's script goes to the node of its slot;
the limits are exact across hundreds of principals spread over the nodes; a slot migrated
under load (TRYAGAIN, ASK, then MOVED) and a stale slot map never fail a call."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from llmserve.clock import ManualClock
from llmserve.config import LimitsConfig, TierConfig
from llmserve.errors import RateLimited
from llmserve.limits import Limiter, StoreUnavailable, store_from_url
from llmserve.limits.stores.cluster import REFRESH_INTERVAL, ClusterClient, key_slot
from llmserve.limits.stores.redis import RedisStore
from llmserve.limits.stores.resp import RespClient, client_from_url
from tests.support.redis_server import (
    ACL_PASSWORD,
    ACL_USER,
    ClusterNodes,
    binary_or_skip,
    command,
    create_acl_user,
)
from tests.support.redis_workout import NOW, key_store_workout, limiter_workout

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterNodes]:
    nodes = ClusterNodes.start_new(tmp_path_factory.mktemp("cluster"), binary_or_skip())
    for port in nodes.ports:
        create_acl_user(port)  # the documented rule: CLUSTER SLOTS and ASKING included
    yield nodes
    nodes.stop()


def user_url(cluster: ClusterNodes, **query: str) -> str:
    url = cluster.url.replace("://", f"://{ACL_USER}:{ACL_PASSWORD}@")
    return url + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")


def cluster_client(limiter: Limiter) -> ClusterClient:
    store = limiter.store
    assert isinstance(store, RedisStore) and isinstance(store.client, ClusterClient)
    return store.client


@pytest.fixture
async def admins(cluster: ClusterNodes) -> AsyncIterator[dict[int, RespClient]]:
    """A plain connection to each node (the default user), to reshard while calls run."""
    clients = {port: RespClient.from_url(f"redis://127.0.0.1:{port}/0") for port in cluster.ports}
    yield clients
    for client in clients.values():
        await client.close()


def principal_on(cluster: ClusterNodes, port: int, avoid: set[int], start: int = 0) -> str:
    """A principal whose slot `port` serves, in no slot of `avoid` (each test its own)."""
    for i in range(start, start + 100_000):
        slot = key_slot(f"user-{i}")
        if slot not in avoid and cluster.owner(slot) == port:
            avoid.add(slot)
            return f"user-{i}"
    raise LookupError("no principal found")


_used_slots: set[int] = set()


async def test_many_principals_are_limited_exactly_each_on_the_node_of_its_slot(
    cluster: ClusterNodes,
) -> None:
    tier = TierConfig(requests_per_minute=3, tokens_per_day=10**6)
    store = store_from_url(user_url(cluster) + "?key_prefix=llmserve:many:")
    limiter = Limiter(LimitsConfig(tiers={"default": tier}), store, ManualClock(NOW))
    principals = [f"tenant-{i}" for i in range(300)]
    _used_slots.update(key_slot(p) for p in principals)

    async def four(principal: str) -> list[bool]:
        outcomes = []
        for _ in range(4):
            try:
                await limiter.reserve(principal, None, {}, 10, 10)
                outcomes.append(True)
            except RateLimited:
                outcomes.append(False)
        return outcomes

    try:
        results = await asyncio.gather(*(four(p) for p in principals))
        assert results == [[True, True, True, False]] * len(principals)
        await limiter.holds._renew()  # one ZADD per principal: one write per node
        client = cluster_client(limiter)
        assert (client.stats.moved, client.stats.refreshes) == (0, 1)
        # each principal's keys live on the node that owns its slot, and every node has some
        owners = {cluster.owner(key_slot(p)) for p in principals}
        assert owners == set(cluster.ports)
        for principal in principals[:30]:
            owner = cluster.owner(key_slot(principal))
            assert command(owner, "EXISTS", f"llmserve:many:{{{principal}}}:holds") == 1
    finally:
        await limiter.close()


async def test_the_limiter_and_the_key_store_work_on_the_cluster(cluster: ClusterNodes) -> None:
    await limiter_workout(user_url(cluster), principal="workout-principal")
    await key_store_workout(user_url(cluster))  # its three hashes: three slots


async def test_a_slot_migrated_under_load_never_fails_a_call(
    cluster: ClusterNodes, admins: dict[int, RespClient]
) -> None:
    source, target = cluster.ports[0], cluster.ports[1]
    principal = principal_on(cluster, source, _used_slots)
    slot = key_slot(principal)
    tier = TierConfig(requests_per_minute=10**6, tokens_per_day=10**9)
    limiter = Limiter(LimitsConfig(tiers={"default": tier}), store_from_url(user_url(cluster)))
    client = cluster_client(limiter)
    admitted = 0
    running = True

    async def worker() -> None:
        nonlocal admitted
        while running:
            reservation = await limiter.reserve(principal, None, {}, 10, 10)
            await limiter.settle(reservation, 10, 5)
            admitted += 1
            await asyncio.sleep(0.001)

    try:
        workers = [asyncio.ensure_future(worker()) for _ in range(4)]
        await asyncio.sleep(0.2)
        # as `redis-cli --cluster reshard` does it, with the load running between the steps
        ids = cluster.ids
        await admins[target].call("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
        await admins[source].call("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
        await asyncio.sleep(0.05)
        while keys := await admins[source].call("CLUSTER", "GETKEYSINSLOT", slot, 100):
            await admins[source].call("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
        await asyncio.sleep(0.1)  # ASK: the keys are on the target, the slot not yet
        for port in [target, *(p for p in cluster.ports if p != target)]:
            await admins[port].call("CLUSTER", "SETSLOT", slot, "NODE", ids[target])
        await asyncio.sleep(0.2)  # MOVED, then the new map
        running = False
        await asyncio.gather(*workers)  # a worker that failed raises here

        assert limiter.stats.store_errors == 0 and limiter.stats.rejected_unavailable == 0
        assert client.stats.asked > 0 and client.stats.moved > 0, client.stats
        assert cluster.owner(slot) == target and client.node_for(slot) == ("127.0.0.1", target)
        windows = {w.name: w.used for w in await limiter.usage(principal, None, {})}
        assert windows["tokens_per_day"] == admitted * 15  # every request, once
    finally:
        running = False
        await limiter.close()


async def test_a_stale_slot_map_is_corrected_by_moved_without_an_error(
    cluster: ClusterNodes,
) -> None:
    source, target = cluster.ports[2], cluster.ports[0]
    principal = principal_on(cluster, source, _used_slots)
    slot = key_slot(principal)
    client = client_from_url(user_url(cluster))
    assert isinstance(client, ClusterClient)
    key = f"llmserve:moved:{{{principal}}}"
    try:
        await client.call("SET", key, "before")
        cluster.migrate_slot(slot, target)  # behind the client's back
        assert client.node_for(slot) == ("127.0.0.1", source)  # stale
        assert await client.call("GET", key) == b"before"  # MOVED, followed
        assert client.stats.moved == 1 and client.node_for(slot) == ("127.0.0.1", target)
        await asyncio.sleep(REFRESH_INTERVAL)  # the map is read at most this often
        assert await client.call_many([("GET", key), ("SET", key, "after")]) == [b"before", "OK"]
        assert client.stats.moved == 1 and client.stats.refreshes == 2  # the map read again
    finally:
        await client.close()


async def test_ask_reaches_a_key_already_migrated_and_tryagain_has_a_limit(
    cluster: ClusterNodes,
) -> None:
    source, target = cluster.ports[1], cluster.ports[2]
    principal = principal_on(cluster, source, _used_slots)
    slot = key_slot(principal)
    url = user_url(cluster, socket_timeout="0.2")
    client = client_from_url(url)
    assert isinstance(client, ClusterClient)
    store = store_from_url(url)
    assert isinstance(store, RedisStore) and isinstance(store.client, ClusterClient)
    holds, _, settled = store._hold_keys(principal)
    try:
        await client.call("SET", f"llmserve:ask:{{{principal}}}", "here")
        cluster.migrate_slot(slot, target, finish=False)  # keys moved, the slot not yet
        assert await client.call("GET", f"llmserve:ask:{{{principal}}}") == b"here"
        assert client.stats.asked == 1 and client.node_for(slot) == ("127.0.0.1", source)
        cluster.finish_migration(slot, target)

        # A script whose keys are on both sides of a migration can only wait for its end
        # (TRYAGAIN); one that never ends fails the call as a store error after socket_timeout.
        await client.call_many([("ZADD", holds, 1, "h"), ("ZADD", settled, 1, "s")])
        ids = cluster.ids
        command(source, "CLUSTER", "SETSLOT", slot, "IMPORTING", ids[target])
        command(target, "CLUSTER", "SETSLOT", slot, "MIGRATING", ids[source])
        command(target, "MIGRATE", "127.0.0.1", source, "", 0, 5000, "KEYS", settled)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="TRYAGAIN"):
            await store.peek(principal, (), NOW)
        assert 0.1 < time.monotonic() - started < 1.0
        assert store.client.stats.tryagain > 3
    finally:
        cluster.finish_migration(slot, source)
        await client.close()
        await store.close()


def test_the_cluster_fixture_spreads_the_slots(cluster: ClusterNodes) -> None:
    assert {cluster.owner(s) for s in (0, 8000, 16383)} == set(cluster.ports)
