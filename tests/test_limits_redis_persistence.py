"""A Redis without persistence loses, when it restarts, every day and month quota (the limiter's
store) or every API key (the key store): `llmserve check` and the server's start-up say so for
either, say nothing when Redis persists, and say once, at INFO, when CONFIG is refused."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from llmserve.auth.redis_store import RedisKeyStore
from llmserve.limits.stores.redis import RedisStore
from tests.support.process import ServerProcess, llmserve_up
from tests.support.redis_server import ACL_PASSWORD, ACL_USER, create_acl_user, start_or_skip

pytestmark = pytest.mark.redis


async def test_the_store_tells_whether_its_server_persists(tmp_path: Path) -> None:
    bare = start_or_skip(tmp_path / "bare")
    durable = start_or_skip(tmp_path / "aof", extra_args=["--appendonly", "yes"])
    try:
        stores = [RedisStore.from_url(bare.url), RedisStore.from_url(durable.url)]
        try:
            warning, none = [await store.persistence_warning() for store in stores]
        finally:
            for store in stores:
                await store.close()
    finally:
        bare.stop()
        durable.stop()
    assert warning is not None and "appendonly yes" in warning and "day and month" in warning
    assert none is None


async def test_a_refused_config_says_once_at_info_that_persistence_was_not_checked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = start_or_skip(tmp_path / "acl")
    create_acl_user(server.port)  # the documented rule: no CONFIG
    url = f"redis://{ACL_USER}:{ACL_PASSWORD}@127.0.0.1:{server.port}/0"
    stores: list[RedisStore | RedisKeyStore] = [
        RedisStore.from_url(url),
        RedisKeyStore.from_url(url),
    ]
    caplog.set_level(logging.DEBUG, logger="llmserve.redis")
    try:
        assert [await store.persistence_warning() for store in stores] == [None, None]
    finally:
        for store in stores:
            await store.close()
        server.stop()
    records = [r for r in caplog.records if r.name == "llmserve.redis"]
    assert [(r.levelno, r.getMessage().split(":")[0]) for r in records] == [
        (logging.INFO, "limits.store"), (logging.INFO, "auth.keys"),
    ]  # fmt: skip
    assert all("could not check whether" in r.getMessage() for r in records)
    assert all("NOPERM" in r.getMessage() and "appendonly yes" in r.getMessage() for r in records)


def test_check_warns_about_a_redis_without_persistence(tmp_path: Path) -> None:
    server = start_or_skip(tmp_path / "redis")
    try:
        config = tmp_path / "c.yaml"
        config.write_text(f"limits: {{store: '{server.url}'}}\nauth: {{keys: '{server.url}'}}\n")
        done = subprocess.run([sys.executable, "-m", "llmserve", "check", "-c", str(config)],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr
    assert "# warning: limits.store: the Redis server at 127.0.0.1:" in done.stderr
    assert "# warning: auth.keys: the Redis server at 127.0.0.1:" in done.stderr


def test_the_server_warns_at_start_up(tmp_path: Path) -> None:
    redis = start_or_skip(tmp_path / "redis")
    config = {
        "engine": {"kind": "fake", "served_model_name": "fake", "max_model_len": 256},
        "auth": {"enabled": False},
        "limits": {"store": redis.url, "state_dir": str(tmp_path / "limits")},
        "usage": {"ledger": None},
    }
    try:
        with llmserve_up(tmp_path, config, ready_path="/ready") as server:
            assert httpx.get(server.base_url + "/health").status_code == 200
            log = wait_for_log(server, "has no persistence")
            server.terminate()
    finally:
        redis.stop()
    assert "has no persistence" in log and "WARNING" in log


def wait_for_log(server: ServerProcess, *lines: str, timeout: float = 10) -> str:
    """The server's log once it holds every one of `lines` (the start-up check runs in the
    background, after /health answers)."""
    deadline = time.monotonic() + timeout
    while not all(line in (log := server.log()) for line in lines):
        assert time.monotonic() < deadline, f"not logged within {timeout}s: {lines}"
        time.sleep(0.05)
    return log


def test_the_server_warns_at_start_up_about_a_key_store_without_persistence(
    tmp_path: Path,
) -> None:
    bare = start_or_skip(tmp_path / "bare")
    durable = start_or_skip(tmp_path / "aof", extra_args=["--appendonly", "yes"])
    config = {
        "engine": {"kind": "fake", "served_model_name": "fake", "max_model_len": 256},
        "auth": {"enabled": True, "keys": bare.url},  # no persistence: every key at risk
        "limits": {"store": durable.url, "state_dir": str(tmp_path / "limits")},
        "usage": {"ledger": None},
        "logging": {"level": "debug"},
    }
    try:
        with llmserve_up(tmp_path, config) as server:
            log = wait_for_log(server, f"auth.keys: the Redis server at 127.0.0.1:{bare.port} has",
                               f"limits.store: the Redis server at 127.0.0.1:{durable.port} "
                               "persists its data")  # fmt: skip
            server.terminate()
    finally:
        bare.stop()
        durable.stop()
    [warning] = [line for line in log.splitlines() if "has no persistence" in line]
    assert "WARNING" in warning and "auth.keys:" in warning
    assert "loses every API key" in warning and "Set `appendonly yes`" in warning
