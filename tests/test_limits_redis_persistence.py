"""A Redis limiter store without persistence loses every day and month quota when it restarts:
`llmserve check` and the server's start-up say so, and say nothing when Redis persists."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from llmserve.limits.stores.redis import RedisStore
from tests.support.process import llmserve_up
from tests.support.redis_server import start_or_skip

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


def test_check_warns_about_a_redis_without_persistence(tmp_path: Path) -> None:
    server = start_or_skip(tmp_path / "redis")
    try:
        config = tmp_path / "c.yaml"
        config.write_text(f"limits: {{store: '{server.url}'}}\n")
        done = subprocess.run([sys.executable, "-m", "llmserve", "check", "-c", str(config)],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr
    assert "# warning: limits.store: the Redis server at 127.0.0.1:" in done.stderr


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
            server.terminate()
            log = server.log()
    finally:
        redis.stop()
    assert "has no persistence" in log and "WARNING" in log
