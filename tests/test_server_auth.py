"""Auth wired into the real server: keys from the CLI, admin routes, the admin port."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from tests.support.process import free_port, llmserve_up


def auth_config(tmp_path, **server):
    return {
        "engine": {"kind": "fake", "served_model_name": "fake", "max_model_len": 512},
        "auth": {"enabled": True, "keys": str(tmp_path / "keys"), "cache_seconds": 0.2},
        "limits": {"state_dir": str(tmp_path / "limits")},
        "usage": {"ledger": str(tmp_path / "usage.jsonl")},
        "server": server,
    }


def create_key(tmp_path, config_path, *args):
    out = subprocess.run(
        [sys.executable, "-m", "llmserve", "keys", "create", "--name", "t", "-c",
         str(config_path), *args],
        capture_output=True, text=True, check=True, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    return next(w for w in out.stdout.split() if w.startswith("sk-llms-"))


@pytest.fixture
def server_with_keys(tmp_path):
    admin_port = free_port()
    with llmserve_up(tmp_path, auth_config(tmp_path, admin_port=admin_port)) as server:
        config_path = next(tmp_path.glob("llmserve-*.yaml"))
        user = create_key(tmp_path, config_path)
        admin = create_key(tmp_path, config_path, "--admin")
        yield server, user, admin, admin_port


def test_every_route_but_health_needs_a_credential(server_with_keys):
    server, user, admin, _ = server_with_keys
    chat = {"model": "fake", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    assert httpx.get(server.base_url + "/health").status_code == 200
    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                         ("GET", "/metrics"), ("GET", "/ready")):  # fmt: skip
        resp = httpx.request(method, server.base_url + path, json=chat)
        assert resp.status_code == 401, path
        assert resp.json()["error"]["code"] == "missing_api_key"
    ok = httpx.post(server.base_url + "/v1/chat/completions", json=chat,
                    headers={"Authorization": f"Bearer {user}"})  # fmt: skip
    assert ok.status_code == 200
    # a user key may not read the admin routes; an admin key may
    for path in ("/ready", "/metrics"):
        denied = httpx.get(server.base_url + path, headers={"X-API-Key": user})
        assert denied.status_code == 403
        assert denied.json()["error"]["code"] == "admin_required"
    assert httpx.get(server.base_url + "/ready", headers={"X-API-Key": admin}).status_code == 200


def test_admin_port_serves_ready_without_credentials(server_with_keys):
    _, _, _, admin_port = server_with_keys
    resp = httpx.get(f"http://127.0.0.1:{admin_port}/ready")
    assert resp.status_code == 200
    assert resp.json()["status"] == "ready"
    assert httpx.get(f"http://127.0.0.1:{admin_port}/v1/models").status_code == 404


def test_a_huge_header_is_a_clean_401_that_echoes_nothing(server_with_keys):
    server, user, _, _ = server_with_keys
    resp = httpx.get(server.base_url + "/v1/models",
                     headers={"Authorization": f"Bearer {user}" + "A" * 100_000})  # fmt: skip
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "invalid_api_key"
    secret = user.rsplit("-", 1)[1]
    assert secret not in resp.text
    assert secret not in server.log()


def test_the_admin_listener_binds_the_configured_host_only(tmp_path):
    admin_port = free_port()
    config = auth_config(tmp_path, admin_port=admin_port)
    config["server"]["admin_host"] = "127.0.0.2"  # another loopback address: a pod IP stand-in
    with llmserve_up(tmp_path, config):
        assert httpx.get(f"http://127.0.0.2:{admin_port}/health").status_code == 200
        assert httpx.get(f"http://127.0.0.2:{admin_port}/ready").status_code == 200
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{admin_port}/ready")
