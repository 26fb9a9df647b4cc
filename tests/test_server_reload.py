"""A running server changes its settings without restarting its engine: SIGHUP and
`llmserve reload` apply tiers, limits and the rest; a broken file or a setting that needs a
restart changes nothing and says why."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from llmserve.config import Config, restart_only
from llmserve.server.reload import changed_settings
from tests.support.api import chat_body
from tests.support.process import ServerProcess, llmserve_up

REPO = Path(__file__).resolve().parents[1]


def base_config(tmp_path: Path, rpm: int) -> dict[str, Any]:
    return {
        "engine": {"kind": "fake", "served_model_name": "fake", "max_model_len": 512,
                   "fake": {"tokens_per_second": 50}},
        "auth": {"enabled": False},
        "server": {"public_metrics": True},
        "limits": {"state_dir": str(tmp_path / "limits"), "default_tier": "t",
                   "tiers": {"t": {"requests_per_minute": rpm, "tokens_per_day": 1_000_000}}},
        "usage": {"ledger": str(tmp_path / "usage.jsonl"), "fsync_seconds": 0},
    }  # fmt: skip


def config_path(server: ServerProcess) -> Path:
    return server.log_path.with_suffix(".yaml")


def rewrite(server: ServerProcess, change) -> None:  # type: ignore[no-untyped-def]
    path = config_path(server)
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data))


def reload_cli(server: ServerProcess) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmserve", "reload", "-c", str(config_path(server))],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip


def limit_header(server: ServerProcess) -> str:
    reply = httpx.post(server.base_url + "/v1/chat/completions", json=chat_body(max_tokens=1))
    assert reply.status_code == 200, reply.text
    return reply.headers["x-ratelimit-limit-requests"]


def metric(server: ServerProcess, prefix: str) -> list[str]:
    text = httpx.get(server.base_url + "/metrics").text
    return [line for line in text.splitlines() if line.startswith(prefix)]


def test_sighup_applies_a_new_limit_while_a_stream_started_before_finishes(tmp_path: Path) -> None:
    with llmserve_up(tmp_path, base_config(tmp_path, rpm=100)) as server:
        assert limit_header(server) == "100"
        started = metric(server, "llmserve_start_time_seconds")
        with httpx.stream("POST", server.base_url + "/v1/chat/completions",
                          json=chat_body(max_tokens=60, stream=True), timeout=30) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")
            rewrite(server, lambda d: d["limits"]["tiers"]["t"].update(requests_per_minute=7))
            os.kill(server.proc.pid, signal.SIGHUP)
            deadline = time.monotonic() + 10
            while limit_header(server) != "7":
                assert time.monotonic() < deadline, server.log()[-2000:]
                time.sleep(0.1)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"  # the stream begun before the reload ran to its end
        assert metric(server, "llmserve_start_time_seconds") == started  # same process, engine
        assert server.proc.poll() is None
        assert 'llmserve_config_reloads_total{result="applied"} 1.0' in metric(
            server, "llmserve_config_reloads_total")
        digest = hashlib.sha256(config_path(server).read_bytes()).hexdigest()
        assert metric(server, "llmserve_config_info") == [
            f'llmserve_config_info{{sha256="{digest}"}} 1.0']
        assert "config reload applied: limits.tiers.t.requests_per_minute" in server.log()


def test_a_broken_file_or_an_engine_change_changes_nothing_and_says_why(tmp_path: Path) -> None:
    with llmserve_up(tmp_path, base_config(tmp_path, rpm=100)) as server:
        good = config_path(server).read_text()
        config_path(server).write_text(good.replace("requests_per_minute: 100",
                                                    "requests_per_minute: lots"))
        broken = reload_cli(server)
        assert broken.returncode == 1, broken.stdout + broken.stderr
        assert broken.stdout.startswith("invalid: nothing changed")
        assert "requests_per_minute" in broken.stdout
        config_path(server).write_text(good)
        rewrite(server, lambda d: (d["engine"].update(max_model_len=1024),
                                   d["limits"]["tiers"]["t"].update(requests_per_minute=5)))
        refused = reload_cli(server)
        assert refused.returncode == 1
        assert "refused: nothing changed" in refused.stdout
        assert "engine.max_model_len" in refused.stdout
        assert limit_header(server) == "100"  # the tier change came with it: not applied
        config_path(server).write_text(good)
        same = reload_cli(server)
        assert (same.returncode, same.stdout.split(":")[0]) == (0, "unchanged")
        counts = metric(server, "llmserve_config_reloads_total")
        assert any('result="invalid"} 1.0' in line for line in counts)
        assert any('result="refused"} 1.0' in line for line in counts)


def test_reloading_under_load_fails_no_request_and_charges_each_once(tmp_path: Path) -> None:
    config = base_config(tmp_path, rpm=100_000)
    config["queue"] = {"max_depth": 200}
    with llmserve_up(tmp_path, config) as server:

        async def stream(client: httpx.AsyncClient) -> int:
            async with client.stream("POST", server.base_url + "/v1/chat/completions",
                                     json=chat_body(max_tokens=20, stream=True)) as r:  # fmt: skip
                body = [line async for line in r.aiter_lines() if line]
                assert body[-1] == "data: [DONE]", body[-3:]
                return r.status_code

        async def reload_many() -> None:
            for i in range(20):
                limit = 100_000 + i + 1
                rewrite(server, lambda d, n=limit: d["limits"]["tiers"]["t"].update(
                    requests_per_minute=n))  # fmt: skip
                os.kill(server.proc.pid, signal.SIGHUP)
                await asyncio.sleep(0.05)

        async def main() -> list[int]:
            limits = httpx.Limits(max_connections=200)
            async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                streams = [asyncio.ensure_future(stream(client)) for _ in range(100)]
                await reload_many()
                return list(await asyncio.gather(*streams))

        statuses = asyncio.run(main())
        assert statuses == [200] * 100
        time.sleep(0.5)
        assert limit_header(server) == "100020"  # the last of the 20 reloads is live
    entries = [json.loads(line) for line in (tmp_path / "usage.jsonl").read_text().splitlines()]
    assert len(entries) == 101  # each request once (and the last header check)
    assert {e["status"] for e in entries} == {200}


def test_restart_only_settings_are_named_and_tier_changes_are_not() -> None:
    old = Config.model_validate({"engine": {"kind": "fake"}})
    new = Config.model_validate({
        "engine": {"kind": "fake", "max_model_len": 4096},
        "limits": {"tiers": {"default": {}, "gold": {"requests_per_minute": 5}}},
        "queue": {"max_depth": 3},
        "server": {"port": 9000, "cors": {"allowed_origins": ["https://a.example"]}},
    })  # fmt: skip
    changed = changed_settings(old, new)
    assert changed == ["engine.max_model_len", "limits.tiers.gold", "queue.max_depth",
                       "server.cors.allowed_origins", "server.port"]  # fmt: skip
    assert [c for c in changed if restart_only(c)] == ["engine.max_model_len", "server.port"]
    assert not restart_only("server.portal")  # a prefix of a name is not the name
    assert restart_only("server.gc_freeze") and restart_only("usage.ledger")


def test_a_new_secret_counts_as_a_change() -> None:  # JSON would mask both as "**********"
    old = Config.model_validate({"auth": {"jwt": {"secret": "a" * 32}}})
    new = Config.model_validate({"auth": {"jwt": {"secret": "b" * 32}}})
    assert changed_settings(old, new) == ["auth.jwt.secret"]
    assert changed_settings(old, old.model_copy(deep=True)) == []


def test_a_reload_expands_variables_again_from_the_servers_own_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LLMSERVE_TEST_UNSET_VAR", raising=False)
    config = base_config(tmp_path, rpm=100)
    config["limits"]["tiers"]["t"]["requests_per_minute"] = "${LLMSERVE_TEST_RPM_A}"
    server_env = {"LLMSERVE_TEST_RPM_A": "300", "LLMSERVE_TEST_RPM_B": "400"}

    def refer_to(name: str) -> None:
        rewrite(server, lambda d: d["limits"]["tiers"]["t"].update(
            requests_per_minute="${" + name + "}"))  # fmt: skip

    with llmserve_up(tmp_path, config, env=server_env) as server:
        assert limit_header(server) == "300"
        refer_to("LLMSERVE_TEST_RPM_B")  # set in the server's environment, not in this one
        applied = reload_cli(server)
        assert applied.stdout.startswith("applied: limits.tiers.t.requests_per_minute")
        assert limit_header(server) == "400"
        refer_to("LLMSERVE_TEST_UNSET_VAR")
        broken = reload_cli(server)
        assert broken.returncode == 1
        assert broken.stdout.startswith("invalid: nothing changed")
        assert "environment variable LLMSERVE_TEST_UNSET_VAR is not set" in broken.stdout
        assert limit_header(server) == "400"
        refer_to("LLMSERVE_TEST_RPM_A")
        assert reload_cli(server).stdout.startswith("applied")
        assert limit_header(server) == "300"


def _es256_key_pair() -> tuple[bytes, bytes]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())  # fmt: skip
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, public


def test_a_public_key_file_rewritten_in_place_is_read_again_on_reload(tmp_path: Path) -> None:
    import jwt

    old_private, old_public = _es256_key_pair()
    new_private, new_public = _es256_key_pair()
    key_file = tmp_path / "jwt.pub"
    key_file.write_bytes(old_public)
    config = base_config(tmp_path, rpm=100)
    jwt_config = {"algorithms": ["ES256"], "public_key_file": str(key_file)}
    config["auth"] = {"enabled": True, "keys": str(tmp_path / "keys"), "jwt": jwt_config}

    def status(private: bytes) -> int:
        token = jwt.encode({"sub": "u", "exp": int(time.time()) + 60}, private, "ES256")
        reply = httpx.post(server.base_url + "/v1/chat/completions", json=chat_body(max_tokens=1),
                           headers={"Authorization": f"Bearer {token}"})  # fmt: skip
        return reply.status_code

    def sighup() -> str:
        """The outcome line of one SIGHUP reload, from the server's log."""
        def outcomes() -> list[str]:
            return [line for line in server.log().splitlines() if "config reload " in line]

        before = len(outcomes())
        os.kill(server.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while len(lines := outcomes()) <= before:
            assert time.monotonic() < deadline, server.log()[-2000:]
            time.sleep(0.05)
        return lines[-1].split("config reload ", 1)[1]

    with llmserve_up(tmp_path, config) as server:
        assert (status(old_private), status(new_private)) == (200, 401)
        assert sighup().startswith("unchanged")
        key_file.write_bytes(new_public)  # the key rotated, same path, same config file
        assert sighup().startswith("applied: auth.jwt.public_key_file")
        assert (status(old_private), status(new_private)) == (401, 200)
        assert sighup().startswith("unchanged")
