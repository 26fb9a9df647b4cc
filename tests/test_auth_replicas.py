"""Issue 16's proof: two real `llmserve up` processes (fake engine) behind one real Redis for
keys and limits. A key created by the CLI works on both, and once revoked is refused by both
within auth.cache_seconds; a revoked JWT subject too; a dead Redis keeps recent keys working
and answers 503 `auth_unavailable` (never 401) for the rest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.process import ServerProcess, llmserve_up
from tests.support.redis_server import RedisServer, start_or_skip

pytestmark = pytest.mark.redis

REPO = Path(__file__).resolve().parents[1]
CACHE_SECONDS = 0.5
JWT_SECRET = "replicas-test-secret-" + "r" * 40
ENV = {"LLMSERVE_JWT_SECRET": JWT_SECRET}


def config(tmp_path: Path, name: str, keys: str, limits_store: str) -> dict[str, Any]:
    return {
        "engine": {"kind": "fake", "served_model_name": "fake", "max_model_len": 512},
        "auth": {
            "keys": keys,
            "cache_seconds": CACHE_SECONDS,
            "jwt": {"algorithms": ["HS256"], "secret": "${LLMSERVE_JWT_SECRET}",
                    "leeway_seconds": 0},
        },
        "limits": {
            "store": limits_store,
            "state_dir": str(tmp_path / name / "limits"),
            "default_tier": "free",
            "tiers": {"free": {"requests_per_minute": 1000, "tokens_per_day": 100_000}},
        },
        "usage": {"ledger": str(tmp_path / name / "usage.jsonl")},
        "server": {"shutdown_grace_seconds": 2},
    }  # fmt: skip


def keys_cli(config_path: Path, *args: str) -> str:
    """The real `llmserve keys ...` in its own process group (killed whole on a timeout)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmserve", "keys", *args, "-c", str(config_path)],
        cwd=REPO, env={**os.environ, **ENV, "PYTHONPATH": str(REPO)}, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, err
    return out


def write_config(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def get_models(server: ServerProcess, credential: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {credential}"}
    return httpx.get(server.base_url + "/v1/models", headers=headers, timeout=10)


def chat(server: ServerProcess, credential: str) -> httpx.Response:
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    headers = {"Authorization": f"Bearer {credential}"}
    return httpx.post(server.base_url + "/v1/chat/completions", json=body, headers=headers,
                      timeout=10)  # fmt: skip


def code_of(response: httpx.Response) -> str | None:
    return response.json()["error"]["code"]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_or_skip(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture
def replicas(
    tmp_path: Path, redis_server: RedisServer
) -> Iterator[tuple[ServerProcess, ServerProcess, Path]]:
    """Two servers sharing one Redis for keys and limits, and a CLI config for that Redis."""
    shared = redis_server.url
    with (
        llmserve_up(tmp_path, config(tmp_path, "a", shared, shared), env=ENV) as a,
        llmserve_up(tmp_path, config(tmp_path, "b", shared, shared), env=ENV) as b,
    ):
        yield a, b, write_config(tmp_path, config(tmp_path, "cli", shared, shared))


def test_a_key_created_by_the_cli_works_on_both_replicas_and_its_revocation_reaches_both(
    replicas: tuple[ServerProcess, ServerProcess, Path],
) -> None:
    a, b, cli = replicas
    created = json.loads(keys_cli(cli, "create", "--name", "svc", "--json"))
    key = created["key"]
    tokens = 0
    for server in (a, b):
        assert get_models(server, key).status_code == 200
        response = chat(server, key)
        assert response.status_code == 200
        tokens += response.json()["usage"]["total_tokens"]
    usage = json.loads(keys_cli(cli, "usage", created["id"], "--json"))
    day = next(w for w in usage["windows"] if w["window"] == "tokens_per_day")
    assert day["used"] == tokens > 0  # one quota for both replicas: limits share the Redis too

    rotated = keys_cli(cli, "rotate", created["id"]).strip()
    time.sleep(CACHE_SECONDS)  # both replicas had the old key's decision cached
    for server in (a, b):
        assert code_of(get_models(server, key)) == "invalid_api_key"
        assert get_models(server, rotated).status_code == 200

    keys_cli(cli, "revoke", created["id"])
    time.sleep(CACHE_SECONDS)  # both replicas had the rotated key cached as good
    for server in (a, b):
        response = get_models(server, rotated)
        assert response.status_code == 401 and code_of(response) == "invalid_api_key"


def test_a_revoked_jwt_subject_is_refused_by_both_replicas(
    replicas: tuple[ServerProcess, ServerProcess, Path],
) -> None:
    a, b, cli = replicas
    alice = keys_cli(cli, "jwt", "--sub", "alice", "--ttl", "1h").strip()
    bob = keys_cli(cli, "jwt", "--sub", "bob", "--ttl", "1h").strip()
    for server in (a, b):
        assert get_models(server, alice).status_code == 200
        assert get_models(server, bob).status_code == 200

    keys_cli(cli, "jwt-revoke", "--sub", "alice")
    time.sleep(CACHE_SECONDS)
    for server in (a, b):
        response = get_models(server, alice)
        assert response.status_code == 401 and code_of(response) == "token_revoked"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert get_models(server, bob).status_code == 200


def test_keys_exported_from_a_directory_store_work_on_a_replica_once_imported_into_redis(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    dir_cli = tmp_path / "dir-cli"
    dir_cli.mkdir()
    dir_config = config(tmp_path, "dir", str(tmp_path / "dir-keys"), "memory://")
    dir_path = write_config(dir_cli, dir_config)
    created = json.loads(keys_cli(dir_path, "create", "--name", "moved", "--json"))
    exported = tmp_path / "keys.json"
    keys_cli(dir_path, "export", str(exported))

    redis_path = write_config(tmp_path, config(tmp_path, "cli", redis_server.url, "memory://"))
    assert "1 keys added" in keys_cli(redis_path, "import", str(exported))
    replica = config(tmp_path, "r", redis_server.url, "memory://")
    with llmserve_up(tmp_path, replica, env=ENV) as server:
        assert get_models(server, created["key"]).status_code == 200


def test_a_dead_redis_keeps_recent_keys_working_and_answers_503_for_unknown_ones(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    # Keys in Redis, limits in memory: what a client sees here is the auth policy alone.
    replica = config(tmp_path, "a", redis_server.url, "memory://")
    replica["auth"]["stale_if_error_seconds"] = 30
    cli = write_config(tmp_path, replica)
    known = json.loads(keys_cli(cli, "create", "--name", "known", "--json"))["key"]
    unseen = json.loads(keys_cli(cli, "create", "--name", "unseen", "--json"))["key"]
    with llmserve_up(tmp_path, replica, env=ENV) as server:
        assert chat(server, known).status_code == 200
        redis_server.stop()
        time.sleep(CACHE_SECONDS)  # the decision has aged out of the cache
        assert chat(server, known).status_code == 200  # decided recently: kept
        for _ in range(3):
            response = chat(server, unseen)  # a valid key this replica never checked
            assert response.status_code == 503, response.text
            assert code_of(response) == "auth_unavailable"
            assert response.headers["Retry-After"] == "1"
        assert "key store unreachable" in server.log()
