"""`llmserve keys ...`: issue, list, show, revoke and rotate API keys; mint test JWTs.

The commands open the same key store as the running server, so changes take effect there
within `auth.cache_seconds` (<= 1 s), without a restart.
"""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from llmserve.auth.jwt import mint_token
from llmserve.auth.keys import KeyNotFound, KeyRecord, KeyStore
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


def _open_store(config: Config) -> KeyStore:
    return KeyStore(config.auth.keys)


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


def _get(store: KeyStore, key_id: str) -> KeyRecord:
    try:
        return store.get(key_id)
    except KeyNotFound as exc:
        raise _fail(str(exc)) from None


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
    with _open_store(config) as store:
        record, api_key = store.create(
            name,
            tier=tier,
            models=_models(models),
            expires=time.time() + lifetime if lifetime is not None else None,
            admin=admin,
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
    with _open_store(config) as store:
        records = store.list()
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
    with _open_store(config) as store:
        record = _get(store, key_id)
    typer.echo(json.dumps(_record_json(record), indent=2))


@keys_app.command("revoke")
def revoke(
    key_id: str = typer.Argument(..., help="Key id."), config_path: Path | None = ConfigOption
) -> None:
    """Revoke a key; a running server refuses it within auth.cache_seconds."""
    config = load_or_exit(config_path)
    with _open_store(config) as store:
        try:
            record = store.revoke(key_id)
        except KeyNotFound as exc:
            raise _fail(str(exc)) from None
    typer.echo(f"revoked {record.id} ({record.name})")


@keys_app.command("rotate")
def rotate(
    key_id: str = typer.Argument(..., help="Key id."), config_path: Path | None = ConfigOption
) -> None:
    """Give a key a new secret (same id, tier, models, limits); the old secret stops working."""
    config = load_or_exit(config_path)
    with _open_store(config) as store:
        try:
            record, api_key = store.rotate(key_id)
        except KeyNotFound as exc:
            raise _fail(str(exc)) from None
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


add_usage_command(keys_app)  # `keys usage ID`: per-window usage read from the limiter's store


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
