"""`llmserve keys` against either store: export from a directory and import into Redis, JWT
revocation, and a Redis that cannot be reached (a message and exit 1, never a traceback)."""

from __future__ import annotations

import asyncio
import json
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner, Result

from llmserve.auth.keys import KeyStore
from llmserve.auth.store import key_store_from_url
from llmserve.cli import keys as keys_cli
from tests.support.redis_server import RedisServer, start_or_skip

JWT_SECRET = "cli-store-test-secret-" + "z" * 40
CONFIG = """
auth:
  keys: "{keys}"
  jwt: {{algorithms: [HS256], secret: "${{LLMSERVE_JWT_SECRET}}", leeway_seconds: 5{jwt_extra}}}
limits:
  default_tier: free
  tiers: {{free: {{requests_per_minute: 5}}, pro: {{requests_per_minute: 50}}}}
"""

Cli = Callable[..., Result]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_or_skip(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture
def make_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Cli]:
    """A `keys` CLI whose config's auth.keys is `keys` (a directory or a URL)."""
    monkeypatch.setenv("LLMSERVE_JWT_SECRET", JWT_SECRET)
    app = typer.Typer()
    keys_cli.register(app)
    runner = CliRunner()

    def make(keys: str, name: str = "llmserve.yaml", jwt_extra: str = "") -> Cli:
        path = tmp_path / name
        path.write_text(CONFIG.format(keys=keys, jwt_extra=jwt_extra))

        def run(*args: str, code: int = 0, stdin: str | None = None) -> Result:
            result = runner.invoke(app, ["keys", *args, "-c", str(path)], input=stdin)
            assert result.exit_code == code, result.output
            return result

        return run

    return make


def stored_records(keys: str) -> list[dict[str, object]]:
    """Every record of a store with its hash (what the CLI never prints)."""

    async def read() -> list[dict[str, object]]:
        store = key_store_from_url(keys)
        try:
            return [r.__dict__ for r in await store.list_keys()]
        finally:
            await store.close()

    return asyncio.run(read())


@pytest.mark.redis
def test_export_from_a_directory_and_import_into_redis_moves_every_record_and_revocation(
    make_cli: Callable[..., Cli], redis_server: RedisServer, tmp_path: Path
) -> None:
    dir_cli = make_cli(str(tmp_path / "keys"), "dir.yaml")
    redis_cli = make_cli(redis_server.url, "redis.yaml")
    made = [
        json.loads(dir_cli("create", "--name", name, *options, "--json").stdout)
        for name, options in (
            ("a", ("--tier", "pro", "--models", "m")),
            ("b", ("--expires", "30d", "--admin")),
            ("c", ()),
        )
    ]
    dir_cli("revoke", made[2]["id"])
    with KeyStore(tmp_path / "keys") as store:
        store.touch({made[0]["id"]: 1234.5})
    dir_cli("jwt-revoke", "--sub", "alice", "--for", "2h")

    exported = tmp_path / "keys.json"
    dir_cli("export", str(exported))
    text = exported.read_text()
    assert stat.S_IMODE(exported.stat().st_mode) == 0o600
    for key in made:  # hashes and metadata only: no secret is in the file
        assert key["key"].split("-", 3)[3] not in text

    result = redis_cli("import", str(exported))
    assert "3 keys added" in result.stdout and "1 JWT revocations" in result.stdout
    assert stored_records(redis_server.url) == stored_records(str(tmp_path / "keys"))

    async def check() -> None:
        store = key_store_from_url(redis_server.url)
        try:
            assert (await store.lookup(made[0]["key"])).tier == "pro"
            assert (await store.lookup(made[1]["key"])).admin is True
            assert (await store.lookup(made[2]["key"])).revoked is not None
            assert [r.field for r in await store.jwt_revocations("alice", None)] == ["sub:alice"]
        finally:
            await store.close()

    asyncio.run(check())
    listed = json.loads(redis_cli("list", "--json").stdout)
    assert [(k["name"], k["status"]) for k in listed] == [
        ("a", "active"), ("b", "active"), ("c", "revoked")
    ]  # fmt: skip

    # Again: nothing changes unless --replace (an old export never undoes a later revocation).
    redis_cli("revoke", made[0]["id"])
    assert "3 kept" in redis_cli("import", str(exported)).stdout
    assert json.loads(redis_cli("show", made[0]["id"]).stdout)["status"] == "revoked"
    assert "3 replaced" in redis_cli("import", "--replace", str(exported)).stdout
    assert json.loads(redis_cli("show", made[0]["id"]).stdout)["status"] == "active"


def test_export_to_stdout_and_import_from_stdin(
    make_cli: Callable[..., Cli], tmp_path: Path
) -> None:
    source = make_cli(str(tmp_path / "a"), "a.yaml")
    target = make_cli(str(tmp_path / "b"), "b.yaml")
    key = json.loads(source("create", "--name", "svc", "--json").stdout)
    document = source("export", "-").stdout
    assert json.loads(document)["format"] == "llmserve-keys"
    target("import", "-", stdin=document)
    with KeyStore(tmp_path / "b") as store:
        assert store.lookup(key["key"]).name == "svc"


def test_import_refuses_what_is_not_an_export(make_cli: Callable[..., Cli], tmp_path: Path) -> None:
    cli = make_cli(str(tmp_path / "keys"))
    bad = tmp_path / "bad.json"
    for content, message in (
        ("not json", "not JSON"),
        ('{"format": "other"}', "not a `llmserve keys export` file"),
        ('{"format": "llmserve-keys", "version": 1, "keys": [{"id": "x"}]}', "invalid id"),
        (
            '{"format": "llmserve-keys", "version": 1, "keys": [{"id": "0123456789ab", '
            '"name": "n", "key_hash": "zz"}]}',
            "key_hash must be 64 hex digits",
        ),
        (
            '{"format": "llmserve-keys", "version": 1, "keys": [{"id": "0123456789ab", '
            f'"name": "n", "key_hash": "{"a" * 64}", "secret": "s"}}]}}',
            "unknown key record fields: secret",
        ),
    ):
        bad.write_text(content)
        assert message in cli("import", str(bad), code=1).output
    assert "cannot read" in cli("import", str(tmp_path / "missing.json"), code=1).output
    assert json.loads(cli("list", "--json").stdout) == []  # nothing half-imported


def test_jwt_revoke_takes_one_subject_or_token_id_and_lists_it(
    make_cli: Callable[..., Cli], tmp_path: Path
) -> None:
    cli = make_cli(str(tmp_path / "keys"))
    assert "--sub" in cli("jwt-revoke", code=2).output
    assert "--sub" in cli("jwt-revoke", "--sub", "a", "--jti", "b", code=2).output
    before = time.time()
    assert "subject 'alice'" in cli("jwt-revoke", "--sub", "alice").stdout
    assert "jti 'tok-1'" in cli("jwt-revoke", "--jti", "tok-1", "--for", "1h").stdout
    listed = {r["kind"]: r for r in json.loads(cli("jwt-revocations", "--json").stdout)}
    assert listed["sub"]["value"] == "alice"
    assert listed["sub"]["until"] == pytest.approx(before + 30 * 86400, abs=5)  # the default
    assert listed["jti"]["until"] == pytest.approx(before + 3600, abs=5)
    assert "alice" in cli("jwt-revocations").stdout


def test_jwt_revoke_keeps_a_revocation_as_long_as_the_longest_token_allowed(
    make_cli: Callable[..., Cli], tmp_path: Path
) -> None:
    cli = make_cli(str(tmp_path / "keys"), jwt_extra=", max_lifetime_seconds: 7200")
    before = time.time()
    cli("jwt-revoke", "--sub", "alice")
    (revocation,) = json.loads(cli("jwt-revocations", "--json").stdout)
    assert revocation["until"] == pytest.approx(before + 7200 + 5, abs=5)  # + leeway
    minted = cli("jwt", "--sub", "bob")
    assert "jti " in minted.stderr and minted.stdout.count(".") == 2


def test_an_unreachable_redis_is_a_message_and_exit_1(
    make_cli: Callable[..., Cli], tmp_path: Path
) -> None:
    from tests.support.redis_server import free_port

    cli = make_cli(f"redis://:pw@127.0.0.1:{free_port()}/0")
    for args in (("list",), ("create", "--name", "x"), ("revoke", "0123456789ab")):
        result = cli(*args, code=1)
        assert "cannot connect" in result.output and "Traceback" not in result.output
        assert "pw" not in result.output
