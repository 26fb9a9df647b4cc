"""`llmserve keys`: round trips through typer's CliRunner and through real subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jwt
import pytest
import typer
from typer.testing import CliRunner

from llmserve.auth.authenticator import Authenticator
from llmserve.auth.keys import KeyStore
from llmserve.cli import keys as keys_cli
from llmserve.config import load_config
from llmserve.errors import AuthenticationFailed

REPO = Path(__file__).resolve().parents[1]
JWT_SECRET = "cli-test-secret-" + "z" * 40
CONFIG = """
auth:
  keys: {keys}
  cache_seconds: 1.0
  jwt: {{algorithms: [HS256], secret: "${{LLMSERVE_JWT_SECRET}}", issuer: iss.test}}
limits:
  default_tier: free
  tiers: {{free: {{requests_per_minute: 5}}, pro: {{requests_per_minute: 50}}}}
"""
# Runs the keys group alone, so the subprocess test does not need every other CLI module.
KEYS_ONLY = (
    "import typer; from llmserve.cli import keys; app = typer.Typer(); keys.register(app); app()"
)


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LLMSERVE_JWT_SECRET", JWT_SECRET)
    path = tmp_path / "llmserve.yaml"
    path.write_text(CONFIG.format(keys=tmp_path / "keys"))
    return path


@pytest.fixture
def cli(config_file: Path):
    app = typer.Typer()
    keys_cli.register(app)
    runner = CliRunner()

    def run(*args: str, code: int = 0):
        result = runner.invoke(app, ["keys", *args, "-c", str(config_file)])
        assert result.exit_code == code, result.output
        return result

    return run


def test_create_list_show_revoke_round_trip(cli, config_file: Path) -> None:
    created = json.loads(
        cli("create", "--name", "svc", "--tier", "pro", "--models", "a,b", "--json").stdout
    )
    api_key, key_id = created["key"], created["id"]
    assert api_key.startswith(f"sk-llms-{key_id}-")
    assert (created["tier"], created["models"], created["status"]) == ("pro", ["a", "b"], "active")

    listed = cli("list", "--json").stdout
    assert [k["id"] for k in json.loads(listed)] == [key_id]
    assert api_key.split("-", 3)[3] not in listed
    assert "key_hash" not in listed

    table = cli("list").stdout
    assert key_id in table and "svc" in table and "active" in table

    shown = json.loads(cli("show", key_id).stdout)
    assert shown["name"] == "svc" and shown["revoked"] is None

    assert key_id in cli("revoke", key_id).stdout
    assert json.loads(cli("show", key_id).stdout)["status"] == "revoked"


def test_plain_create_prints_only_the_key_on_stdout(cli, config_file: Path) -> None:
    result = cli("create", "--name", "svc", "--expires", "30d", "--admin")
    api_key = result.stdout.strip()
    record = KeyStore(load_config(config_file).auth.keys).lookup(api_key)
    assert record is not None and record.admin
    assert record.expires == pytest.approx(record.created + 30 * 86400, abs=5)


def test_rotate_prints_a_new_key_for_the_same_record(cli, config_file: Path) -> None:
    old = json.loads(cli("create", "--name", "svc", "--json").stdout)
    new_key = cli("rotate", old["id"]).stdout.strip()
    assert new_key != old["key"] and new_key.startswith(f"sk-llms-{old['id']}-")
    with KeyStore(load_config(config_file).auth.keys) as store:
        assert store.lookup(old["key"]) is None
        assert store.lookup(new_key).id == old["id"]


def test_jwt_mints_a_token_the_server_accepts(cli, config_file: Path) -> None:
    token = cli("jwt", "--sub", "user-9", "--tier", "pro", "--ttl", "15m", "--models", "m").stdout
    config = load_config(config_file)
    auth = Authenticator(config.auth, None, known_tiers=config.limits.tiers)
    principal = asyncio.run(auth.authenticate({"Authorization": f"Bearer {token.strip()}"}))
    assert (principal.id, principal.tier, principal.models) == ("jwt:user-9", "pro", {"m"})
    claims = jwt.decode(token.strip(), options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 900 and claims["iss"] == "iss.test"


def test_mistakes_exit_non_zero_with_a_message(cli) -> None:
    assert "unknown tier" in cli("create", "--name", "x", "--tier", "gold", code=2).output
    assert "duration" in cli("create", "--name", "x", "--expires", "soon", code=2).output
    assert "no key with id" in cli("show", "000000000000", code=1).output
    assert "no key with id" in cli("revoke", "000000000000", code=1).output


def test_missing_config_exits_2(tmp_path: Path) -> None:
    app = typer.Typer()
    keys_cli.register(app)
    result = CliRunner().invoke(app, ["keys", "list", "-c", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "not found" in result.output


# -- real subprocesses --------------------------------------------------------------------------


def _main_cli_importable() -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", "import llmserve.cli.main"], cwd=REPO, capture_output=True
    )
    return probe.returncode == 0


def run_cli(entry: list[str], *args: str, env: dict[str, str]) -> str:
    """Run the CLI in its own process group; on timeout kill the whole group."""
    proc = subprocess.Popen(
        [sys.executable, *entry, "keys", *args], cwd=REPO, env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, err
    return out


ENTRIES = {
    "keys-only": ["-c", KEYS_ONLY],
    "python -m llmserve": pytest.param(
        ["-m", "llmserve"],
        marks=pytest.mark.skipif(
            not _main_cli_importable(), reason="llmserve.cli.main does not import yet"
        ),
    ),
}


@pytest.mark.parametrize("entry", list(ENTRIES.values()), ids=list(ENTRIES))
def test_revocation_by_another_process_is_seen_within_one_second(
    entry: list[str], config_file: Path
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    created = json.loads(
        run_cli(entry, "create", "--name", "svc", "--json", "-c", str(config_file), env=env)
    )
    config = load_config(config_file)
    now = [1000.0]
    with KeyStore(config.auth.keys) as store:
        auth = Authenticator(config.auth, store, clock=lambda: now[0])
        headers = {"X-API-Key": created["key"]}
        assert asyncio.run(auth.authenticate(headers)).id == created["id"]

        assert "revoked" in run_cli(entry, "revoke", created["id"], "-c", str(config_file), env=env)
        listed = json.loads(run_cli(entry, "list", "--json", "-c", str(config_file), env=env))
        assert listed[0]["status"] == "revoked"

        now[0] += 1.0  # config.auth.cache_seconds is 1.0, the most the config allows
        with pytest.raises(AuthenticationFailed) as info:
            asyncio.run(auth.authenticate(headers))
    assert info.value.code == "invalid_api_key"
