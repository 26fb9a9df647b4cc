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


def write_model_config(tmp_path: Path, ledger: bool = True) -> Path:
    path = tmp_path / "llmserve.yaml"
    data = {
        "engine": {"kind": "fake", "served_model_name": "base",
                   "lora": {"adapters": {"sql": "./adapters/sql"}}, "aliases": {"gpt-sql": "sql"}},
        "auth": {"keys": str(tmp_path / "keys")},
        "limits": {"state_dir": str(tmp_path / "limits"), "tiers": {
            "default": {}, "pro": {"tokens_per_day": 10_000,
                                   "models": {"sql": {"tokens_per_day": 1_000}}}}},
        "usage": {"ledger": str(tmp_path / "usage.jsonl") if ledger else None},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def write_ledger(config_path: Path, key_id: str) -> None:
    from llmserve.records import RequestRecord
    from llmserve.usage import open_ledger

    ledger = open_ledger(load_config(config_path).usage)
    assert ledger is not None
    for i, (principal, model, prompt, completion) in enumerate([
        (key_id, "sql", 10, 20), (key_id, "gpt-sql", 5, 5), (key_id, "base", 1, 1),
        ("someone-else", "sql", 1000, 1000),
    ]):  # fmt: skip
        ledger.append(RequestRecord(f"r{i}", "chat", 1.0, principal_id=principal, model=model,
                                    prompt_tokens=prompt, completion_tokens=completion,
                                    status=200))  # fmt: skip
    ledger.close()


def test_usage_shows_each_models_windows_and_by_model_the_ledgers_totals(tmp_path: Path) -> None:
    config_path = write_model_config(tmp_path)
    with KeyStore(tmp_path / "keys") as keys:
        record, _ = keys.create("ci", tier="pro")
    limits = load_config(config_path).limits

    async def spend() -> None:
        limiter = Limiter(limits, store_from_url(limits.store, limits.state_dir))
        await limiter.settle(await limiter.reserve(record.id, "pro", {}, 300, 0, "sql"), 300, 0)
        await limiter.close()

    asyncio.run(spend())
    write_ledger(config_path, record.id)
    args = ["usage", record.id, "--by-model", "-c", str(config_path)]
    report = json.loads(CliRunner().invoke(keys_app(), [*args, "--json"]).output)
    assert [(w["window"], w["model"], w["used"], w["remaining"]) for w in report["windows"]] == [
        ("tokens_per_day", None, 300, 9_700), ("tokens_per_day", "sql", 300, 700)]  # fmt: skip
    assert report["models"] == [  # the alias counts as sql; most tokens first
        {"model": "sql", "requests": 2, "prompt_tokens": 15, "completion_tokens": 25,
         "total_tokens": 40},
        {"model": "base", "requests": 1, "prompt_tokens": 1, "completion_tokens": 1,
         "total_tokens": 2},
    ]  # fmt: skip
    table = CliRunner().invoke(keys_app(), args, env={"COLUMNS": "120"})
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert any("tokens per day" in line and "all models" in line and "9700" in line
               for line in lines)  # fmt: skip
    assert any("tokens per day" in line and " sql " in line and "700" in line for line in lines)
    assert "by model (usage ledger)" in table.output
    assert any(" sql " in line and " 40 " in line for line in lines)


def test_usage_by_model_without_a_ledger_is_an_error(tmp_path: Path) -> None:
    config_path = write_model_config(tmp_path, ledger=False)
    with KeyStore(tmp_path / "keys") as keys:
        record, _ = keys.create("ci", tier="pro")
    result = CliRunner().invoke(keys_app(), ["usage", record.id, "--by-model", "-c",
                                             str(config_path)])  # fmt: skip
    assert result.exit_code == 1
    assert "--by-model reads the usage ledger, and usage.ledger is off" in result.output
