"""Redis Sentinel for real (a master, a replica, three sentinels, quorum 2): the store finds
the master through the sentinels; when the master dies under load, calls fail as store errors
(`on_store_error` decides) until a replica is promoted, then limits apply again, exactly; a
failover ordered while the master is up costs no error at all."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmserve.limits import Limiter, StoreUnavailable, store_from_url
from llmserve.limits.stores.redis import RedisStore
from llmserve.limits.stores.resp import RespClient
from llmserve.limits.stores.sentinel import SentinelClient
from tests.support.limiter_load import (
    Load,
    assert_enforced_exactly,
    day_used,
    failover_limiter,
    settled,
)
from tests.support.redis_server import (
    ACL_PASSWORD,
    ACL_USER,
    SERVICE,
    SentinelGroup,
    binary_or_skip,
    create_acl_user,
    free_port,
    ok,
    write_replicated,
)

pytestmark = pytest.mark.redis


@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    group = SentinelGroup.start_new(tmp_path / "sentinel", binary_or_skip())
    yield group
    group.stop()


def sentinel_client(limiter: Limiter) -> SentinelClient:
    store = limiter.store
    assert isinstance(store, RedisStore) and isinstance(store.client, SentinelClient)
    return store.client


async def test_the_master_dies_under_load_closed_refuses_then_limits_apply_exactly(
    group: SentinelGroup,
) -> None:
    for server in group.servers:  # the documented ACL user, on the master and the replica
        create_acl_user(server.port)
    hosts = ",".join(f"127.0.0.1:{s.port}" for s in group.sentinels)
    dead_sentinel = f"127.0.0.1:{free_port()}"  # listed first: skipped
    url = f"redis+sentinel://{ACL_USER}:{ACL_PASSWORD}@{dead_sentinel},{hosts}/{SERVICE}"
    limiter = failover_limiter(url, "closed")
    client = sentinel_client(limiter)
    old_master, replica = group.master_port(), group.servers[1].port
    try:
        before = Load(limiter)
        await before.run(until=time.monotonic() + 0.3)
        assert before.admitted > 0 and before.refused == 0 and not before.errors
        assert client.master_address == ("127.0.0.1", old_master)
        # WAIT after a write of ours (WAIT waits for its own client's writes): the replica
        # has every charge so far.
        admin = RespClient.from_url(f"redis://127.0.0.1:{old_master}/0")  # may WAIT
        try:
            assert await write_replicated(admin, "llmserve:replicated", "1")
        finally:
            await admin.close()

        killed = time.monotonic()
        group.kill_master()
        during = Load(limiter)
        await during.run(until=time.monotonic() + 20, stop_after_streak=50)
        switch_seconds = time.monotonic() - killed

        assert not during.errors, during.errors[:3]
        assert during.refused > 0  # the switch was not free: 503s while no master answered
        assert during.unchecked == 0 and limiter.stats.admitted_unchecked == 0  # closed held
        assert during.streak >= 50, f"no master reached within {switch_seconds:.1f}s"
        assert group.master_port() == replica
        assert client.master_address == ("127.0.0.1", replica)
        await settled(limiter)
        await assert_enforced_exactly(limiter, before.used + during.used)
        print(f"failover: {during.refused} refused over {switch_seconds:.1f}s")
    finally:
        await limiter.close()


async def test_a_failover_while_the_master_is_up_costs_no_error(group: SentinelGroup) -> None:
    limiter = failover_limiter(group.url, "open")
    client = sentinel_client(limiter)
    replica = group.servers[1].port
    try:
        load = Load(limiter)
        running = asyncio.ensure_future(load.run(until=time.monotonic() + 20))
        await asyncio.sleep(0.2)
        ok(group.sentinels[1].port, "SENTINEL", "FAILOVER", SERVICE)
        deadline = time.monotonic() + 15
        while client.master_address != ("127.0.0.1", replica):
            assert time.monotonic() < deadline, "the client did not move to the new master"
            await asyncio.sleep(0.02)
        moved = load.admitted
        while load.admitted < moved + 50:
            await asyncio.sleep(0.02)
        load.stopped = True
        await running

        assert not load.errors, load.errors[:3]
        assert load.unchecked == 0 and limiter.stats.store_errors == 0  # not one failure
        assert client.switches == 1 and group.master_port() == replica
        # Enforced on the new master from what it holds (charges the old master took after
        # the promotion and before the switch are not there: docs/limits.md says so).
        used = await day_used(limiter)
        assert 0 < used <= load.used
        await assert_enforced_exactly(limiter, used)
    finally:
        await limiter.close()


async def test_no_sentinel_naming_the_master_is_a_store_error_that_ran_nothing(
    group: SentinelGroup,
) -> None:
    hosts = ",".join(f"127.0.0.1:{s.port}" for s in group.sentinels)
    for url, message in (
        (f"redis+sentinel://{hosts}/nope", "knows no master 'nope'"),
        (f"redis+sentinel://127.0.0.1:{free_port()}/{SERVICE}", "cannot connect"),
    ):
        store = store_from_url(url)
        try:
            with pytest.raises(StoreUnavailable, match=message) as caught:
                await store.peek("alice", (), 0.0)
            assert caught.value.maybe_applied is False
        finally:
            await store.close()


async def test_sentinels_that_require_a_password_get_the_sentinel_credentials(
    group: SentinelGroup,
) -> None:
    sentinel = group.sentinels[0].port
    ok(sentinel, "ACL", "SETUSER", "watcher", "on", ">sentinel-pw", "+@all")
    ok(sentinel, "ACL", "SETUSER", "default", "off")  # no more unauthenticated access
    base = f"redis+sentinel://127.0.0.1:{sentinel}/{SERVICE}"
    with_credentials = f"{base}?sentinel_username=watcher&sentinel_password=sentinel-pw"
    for url, works in ((base, False), (with_credentials, True)):
        store = store_from_url(url)
        try:
            if works:
                assert await store.peek("alice", (), 0.0) == ()
            else:
                with pytest.raises(StoreUnavailable, match="NOAUTH"):
                    await store.peek("alice", (), 0.0)
        finally:
            await store.close()
