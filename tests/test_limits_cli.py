"""`llmserve keys usage ID` reads a key's windows from the configured store."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import typer
import yaml
from typer.testing import CliRunner

from llmserve.auth.keys import KeyStore
from llmserve.cli.keys_usage import add_usage_command
from llmserve.config import load_config
from llmserve.limits import Limiter, store_from_url


def keys_app() -> typer.Typer:
    app = typer.Typer()
    add_usage_command(app)
    app.command("noop")(lambda: None)  # a second command keeps `usage` a subcommand
    return app


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "llmserve.yaml"
    data = {
        "auth": {"keys": str(tmp_path / "keys")},
        "limits": {
            "state_dir": str(tmp_path / "limits"),
            "tiers": {
                "default": {},
                "pro": {"requests_per_minute": 60, "tokens_per_day": 10_000},
            },
        },
    }
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def spend(config_path: Path, key_id: str, tier: str, overrides: dict[str, int]) -> None:
    limits = load_config(config_path).limits

    async def run() -> None:
        limiter = Limiter(limits, store_from_url(limits.store, limits.state_dir))
        reservation = await limiter.reserve(key_id, tier, overrides, 300, 700)
        await limiter.settle(reservation, 300, 100)
        await limiter.close()

    asyncio.run(run())


def test_usage_prints_each_window_as_json_with_the_keys_overrides(tmp_path: Path) -> None:
    config_path = write_config(tmp_path)
    with KeyStore(tmp_path / "keys") as keys:
        record, _ = keys.create("ci", tier="pro", limits={"tokens_per_day": 20_000})
    spend(config_path, record.id, "pro", record.limits)
    result = CliRunner().invoke(keys_app(), ["usage", record.id, "--json", "-c", str(config_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    windows = {w["window"]: w for w in report["windows"]}
    assert windows["tokens_per_day"]["used"] == 400
    assert windows["tokens_per_day"]["remaining"] == 19_600
    assert windows["requests_per_minute"]["limit"] == 60


def test_usage_table_and_unknown_key(tmp_path: Path) -> None:
    config_path = write_config(tmp_path)
    with KeyStore(tmp_path / "keys") as keys:
        record, _ = keys.create("ci", tier="pro")
    table = CliRunner().invoke(keys_app(), ["usage", record.id, "-c", str(config_path)])
    assert table.exit_code == 0 and "tokens per day" in table.output
    missing = CliRunner().invoke(keys_app(), ["usage", "000000000000", "-c", str(config_path)])
    assert missing.exit_code == 1
    assert "no key with id" in missing.output
