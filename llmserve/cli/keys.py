"""`llmserve keys ...`: issue, list, show, revoke and rotate API keys; mint and revoke JWTs;
export and import the store.

The commands open the same key store as the running servers (`auth.keys`: a directory, or a
Redis every replica shares), so changes take effect there within `auth.cache_seconds`
(<= 1 s), without a restart.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from llmserve.auth.jwt import describe_claims, mint_token
from llmserve.auth.keys import (
    ImportCount,
    InvalidExport,
    JwtRevocation,
    KeyNotFound,
    KeyRecord,
    KeyStoreUnavailable,
    export_document,
    parse_export,
)
from llmserve.auth.store import KeyStoreBackend, key_store_from_url
from llmserve.cli.common import ConfigOption, load_or_exit
from llmserve.cli.keys_usage import add_usage_command
from llmserve.config import Config
from llmserve.errors import ConfigError

keys_app = typer.Typer(
    name="keys", help="Manage API keys (works while the server runs).", no_args_is_help=True
)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")


def parse_duration(text: str) -> float:
    """'90', '90s', '15m', '1h', '30d', '2w' -> seconds."""
    match = _DURATION.match(text.lower())
    if match is None or float(match.group(1)) <= 0:
        raise typer.BadParameter(f"{text!r} is not a duration like 30d, 12h, 15m or 90s")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def _models(text: str | None) -> list[str] | None:
    if text is None:
        return None
    models = [m.strip() for m in text.split(",") if m.strip()]
    if not models:
        raise typer.BadParameter("--models needs at least one model name")
    return models


def _check_tier(config: Config, tier: str | None) -> None:
    if tier is not None and tier not in config.limits.tiers:
        known = ", ".join(sorted(config.limits.tiers))
        raise typer.BadParameter(f"unknown tier {tier!r} (the config defines: {known})")


T = TypeVar("T")


def with_store(config: Config, action: Callable[[KeyStoreBackend], Awaitable[T]]) -> T:
    """Run `action` against the store `auth.keys` names, then close it. A store that cannot
    be reached exits 1 with its message; an unknown id too."""

    async def run() -> T:
        store = key_store_from_url(config.auth.keys)
        try:
            return await action(store)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except (KeyNotFound, KeyStoreUnavailable) as exc:
        raise _fail(str(exc)) from None
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _status(record: KeyRecord) -> str:
    if record.revoked is not None:
        return "revoked"
    return "expired" if record.is_expired(time.time()) else "active"


def _record_json(record: KeyRecord) -> dict[str, object]:
    return {**record.public_dict(), "status": _status(record)}


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@keys_app.command("create")
def create(
    name: str = typer.Option(..., "--name", help="Who or what the key is for."),
    tier: str | None = typer.Option(None, "--tier", help="Tier (default: limits.default_tier)."),
    models: str | None = typer.Option(None, "--models", help="Allowed models, comma-separated."),
    expires: str | None = typer.Option(None, "--expires", help="Lifetime, e.g. 30d, 12h."),
    admin: bool = typer.Option(False, "--admin", help="May read /metrics and /ready."),
    as_json: bool = typer.Option(False, "--json", help="Print id and key as JSON."),
    config_path: Path | None = ConfigOption,
) -> None:
    """Create a key and print it once: it is not stored and cannot be shown again."""
    config = load_or_exit(config_path)
    _check_tier(config, tier)
    lifetime = parse_duration(expires) if expires is not None else None
    allowed = _models(models)
    record, api_key = with_store(
        config,
        lambda store: store.create(
            name,
            tier=tier,
            models=allowed,
            expires=time.time() + lifetime if lifetime is not None else None,
            admin=admin,
        ),
    )
    if as_json:
        typer.echo(json.dumps({**_record_json(record), "key": api_key}))
        return
    typer.echo(api_key)
    typer.echo(f"id {record.id}: store this key now; it cannot be shown again.", err=True)


@keys_app.command("list")
def list_keys(
    as_json: bool = typer.Option(False, "--json", help="Print a JSON array."),
    config_path: Path | None = ConfigOption,
) -> None:
    """List keys (never their secrets)."""
    config = load_or_exit(config_path)
    records = with_store(config, lambda store: store.list_keys())
    if as_json:
        typer.echo(json.dumps([_record_json(r) for r in records], indent=2))
        return
    Console().print(_table(records))


def _table(records: list[KeyRecord]) -> Table:
    table = Table(title=f"{len(records)} API keys")
    table.add_column("id", no_wrap=True)  # ids are copied into other commands: keep whole
    for column in ("name", "tier", "models", "status", "created", "expires", "last used"):
        table.add_column(column)
    for r in records:
        models = ",".join(r.models) if r.models is not None else "all"
        tier = (r.tier or "(default)") + (" admin" if r.admin else "")
        table.add_row(
            r.id, r.name, tier, models, _status(r),
            _when(r.created), _when(r.expires), _when(r.last_used),
        )  # fmt: skip
    return table


@keys_app.command("show")
def show(
    key_id: str = typer.Argument(..., help="Key id."), config_path: Path | None = ConfigOption
) -> None:
    """Show one key's record as JSON."""
    config = load_or_exit(config_path)
    record = with_store(config, lambda store: store.get(key_id))
    typer.echo(json.dumps(_record_json(record), indent=2))


@keys_app.command("revoke")
def revoke(
    key_id: str = typer.Argument(..., help="Key id."), config_path: Path | None = ConfigOption
) -> None:
    """Revoke a key; a running server refuses it within auth.cache_seconds."""
    config = load_or_exit(config_path)
    record = with_store(config, lambda store: store.revoke(key_id))
    typer.echo(f"revoked {record.id} ({record.name})")


@keys_app.command("rotate")
def rotate(
    key_id: str = typer.Argument(..., help="Key id."), config_path: Path | None = ConfigOption
) -> None:
    """Give a key a new secret (same id, tier, models, limits); the old secret stops working."""
    config = load_or_exit(config_path)
    record, api_key = with_store(config, lambda store: store.rotate(key_id))
    typer.echo(api_key)
    typer.echo(f"id {record.id}: new secret; the previous one no longer works.", err=True)


@keys_app.command("jwt")
def mint(
    sub: str = typer.Option(..., "--sub", help="Subject (the caller's id)."),
    tier: str | None = typer.Option(None, "--tier", help="Tier claim."),
    ttl: str = typer.Option("1h", "--ttl", help="Lifetime, e.g. 15m, 1h, 7d."),
    models: str | None = typer.Option(None, "--models", help="Allowed models, comma-separated."),
    config_path: Path | None = ConfigOption,
) -> None:
    """Mint a JWT for testing, signed with auth.jwt's secret or private key."""
    config = load_or_exit(config_path)
    if config.auth.jwt is None:
        raise _fail("auth.jwt is not configured", 2)
    _check_tier(config, tier)
    try:
        token = mint_token(
            config.auth.jwt, sub, tier=tier, models=_models(models), ttl_seconds=parse_duration(ttl)
        )
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None
    typer.echo(token)
    claims = json.loads(describe_claims(token))
    typer.echo(f"sub {sub}, jti {claims.get('jti')}: revoke with `keys jwt-revoke`", err=True)


# -- JWT revocation ----------------------------------------------------------------------------

DEFAULT_JWT_REVOCATION_SECONDS = 30 * 86400.0  # when auth.jwt.max_lifetime_seconds is unset


def _revocation_horizon(config: Config, keep: str | None) -> float:
    if keep is not None:
        return parse_duration(keep)
    jwt_config = config.auth.jwt
    if jwt_config is not None and jwt_config.max_lifetime_seconds is not None:
        return jwt_config.max_lifetime_seconds + jwt_config.leeway_seconds
    return DEFAULT_JWT_REVOCATION_SECONDS


@keys_app.command("jwt-revoke")
def jwt_revoke(
    sub: str | None = typer.Option(
        None, "--sub", help="Refuse every token of this subject issued until now."
    ),
    jti: str | None = typer.Option(None, "--jti", help="Refuse the token with this `jti`."),
    keep: str | None = typer.Option(
        None,
        "--for",
        help="How long the revocation is kept and enforced, e.g. 7d (default: "
        "auth.jwt.max_lifetime_seconds plus the leeway, else 30d).",
    ),
    config_path: Path | None = ConfigOption,
) -> None:
    """Revoke JWTs before their exp: every server refuses them (401 token_revoked) within
    auth.cache_seconds."""
    if (sub is None) == (jti is None) or not (sub or jti):
        raise typer.BadParameter("give one of --sub SUBJECT or --jti TOKEN_ID")
    config = load_or_exit(config_path)
    if config.auth.jwt is None:
        raise _fail("auth.jwt is not configured", 2)
    horizon = _revocation_horizon(config, keep)
    now = time.time()
    kind: Literal["sub", "jti"] = "sub" if sub is not None else "jti"
    revocation = JwtRevocation(kind, sub or jti or "", now, now + horizon)
    stored = with_store(config, lambda store: store.revoke_jwt(revocation))
    what = (
        f"tokens of subject {stored.value!r} issued up to {_when(stored.revoked_at)}"
        if stored.kind == "sub"
        else f"the token with jti {stored.value!r}"
    )
    typer.echo(f"revoked {what}; refused until {_when(stored.until)}")


@keys_app.command("jwt-revocations")
def jwt_revocations(
    as_json: bool = typer.Option(False, "--json", help="Print a JSON array."),
    config_path: Path | None = ConfigOption,
) -> None:
    """List the JWT revocations in force."""
    config = load_or_exit(config_path)
    revocations = with_store(config, lambda store: store.list_jwt_revocations())
    if as_json:
        typer.echo(json.dumps([asdict(r) for r in revocations], indent=2))
        return
    table = Table(title=f"{len(revocations)} JWT revocations")
    for column in ("kind", "value", "revoked", "until"):
        table.add_column(column)
    for r in revocations:
        table.add_row(r.kind, r.value, _when(r.revoked_at), _when(r.until))
    Console().print(table)


# -- moving records between stores --------------------------------------------------------------


@keys_app.command("export")
def export(
    file: str = typer.Argument(..., help="File to write (`-`: standard output)."),
    config_path: Path | None = ConfigOption,
) -> None:
    """Write every key record and JWT revocation to FILE as JSON: hashes and metadata, never a
    secret (`keys import` reads it into another store)."""
    config = load_or_exit(config_path)

    async def read(store: KeyStoreBackend) -> tuple[list[KeyRecord], list[JwtRevocation], str]:
        return await store.list_keys(), await store.list_jwt_revocations(), store.where

    records, revocations, where = with_store(config, read)
    text = json.dumps(export_document(records, revocations, time.time()), indent=2) + "\n"
    if file == "-":
        typer.echo(text, nl=False)
    else:
        _write_private(Path(file), text)
    typer.echo(
        f"exported {len(records)} keys and {len(revocations)} JWT revocations from {where}",
        err=True,
    )


def _write_private(path: Path, text: str) -> None:
    """Write `text` to a file only its owner can read (it names every key and its hash)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            os.fchmod(out.fileno(), 0o600)
            out.write(text)
    except OSError as exc:
        raise _fail(f"cannot write {path}: {exc.strerror}") from None


@keys_app.command("import")
def import_(
    file: str = typer.Argument(..., help="A `keys export` file (`-`: standard input)."),
    replace: bool = typer.Option(
        False, "--replace", help="Overwrite keys whose id is already in the store."
    ),
    config_path: Path | None = ConfigOption,
) -> None:
    """Add the key records and JWT revocations of a `keys export` file to this store (keys
    whose id is already here are kept, unless --replace)."""
    config = load_or_exit(config_path)
    try:
        text = typer.get_text_stream("stdin").read() if file == "-" else Path(file).read_text()
        records, revocations = parse_export(text)
    except OSError as exc:
        raise _fail(f"cannot read {file}: {exc.strerror}") from None
    except InvalidExport as exc:
        raise _fail(f"{file}: {exc}") from None
    unknown = sorted({r.tier for r in records if r.tier is not None} - set(config.limits.tiers))
    if unknown:  # imported anyway: the server refuses such keys with 403 unknown_tier
        typer.echo(f"warning: tiers not in this config: {', '.join(unknown)}", err=True)

    async def write(store: KeyStoreBackend) -> tuple[ImportCount, int, str]:
        count = await store.put_records(records, replace=replace)
        now = time.time()
        active = [r for r in revocations if r.active(now)]
        for revocation in active:
            await store.revoke_jwt(revocation)
        return count, len(active), store.where

    count, revoked, where = with_store(config, write)
    kept = f", {count.kept} kept (already there; --replace overwrites)" if count.kept else ""
    typer.echo(
        f"imported into {where}: {count.added} keys added, {count.replaced} replaced{kept}; "
        f"{revoked} JWT revocations"
    )


add_usage_command(keys_app)  # `keys usage ID`: per-window usage read from the limiter's store


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
