"""`llmserve keys usage ID`: a key's usage and remaining quota per window, from the store;
with `--by-model`, also what it used of each model, from the usage ledger."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from llmserve.auth.keys import KeyRecord
from llmserve.auth.store import key_store_from_url
from llmserve.cli.common import ConfigOption, load_or_exit
from llmserve.config import Config
from llmserve.errors import LLMServeError
from llmserve.limits.headers import format_duration
from llmserve.limits.usage import read_usage, usage_record
from llmserve.limits.windows import WindowStatus
from llmserve.usage import UsageTotals, summarize_by_model
from llmserve.usage import read_usage as read_ledger


def add_usage_command(keys_app: typer.Typer) -> None:
    keys_app.command("usage")(usage)


def usage(
    key_id: str = typer.Argument(..., help="The key's id (as `keys list` shows it)."),
    as_json: bool = typer.Option(False, "--json", help="Print the windows as JSON."),
    by_model: bool = typer.Option(
        False, "--by-model", help="Also the key's requests and tokens per model (usage ledger)."
    ),
    config_path: Path | None = ConfigOption,
) -> None:
    """Show a key's current usage, remaining quota and reset time per rate-limit window."""
    config = load_or_exit(config_path)
    if by_model and config.usage.ledger is None:
        typer.echo("error: --by-model reads the usage ledger, and usage.ledger is off", err=True)
        raise typer.Exit(1)

    async def read() -> tuple[KeyRecord, list[WindowStatus]]:
        keys = key_store_from_url(config.auth.keys)
        try:
            record = await keys.get(key_id)
        finally:
            await keys.close()
        return record, await read_usage(config.limits, record.id, record.tier, record.limits)

    try:
        record, windows = asyncio.run(read())
    except LLMServeError as exc:  # no such key, a store unreachable, bad overrides
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    records = [usage_record(w) for w in windows]
    models = _by_model(config, record.id) if by_model else None
    if as_json:
        report: dict[str, Any] = {"id": record.id, "tier": record.tier, "windows": records}
        if models is not None:
            report["models"] = [{"model": name, **_totals(t)} for name, t in models.items()]
        typer.echo(json.dumps(report))
        return
    console = Console()
    if records:
        console.print(_table(record.id, records))
    else:
        typer.echo(f"{record.id}: its tier has no limits")
    if models is not None:
        console.print(_models_table(record.id, models))


def _table(key_id: str, records: list[dict[str, Any]]) -> Table:
    table = Table(title=f"usage of {key_id}")
    per_model = any(r["model"] is not None for r in records)
    columns = ("window", "model") if per_model else ("window",)
    for column in (*columns, "limit", "used", "remaining", "resets in"):
        table.add_column(column, justify="left" if column in columns else "right")
    for r in records:
        scope = (r["model"] or "all models",) if per_model else ()
        table.add_row(
            str(r["label"]),
            *scope,
            str(r["limit"]),
            str(r["used"]),
            str(r["remaining"]),
            format_duration(math.ceil(float(r["reset_seconds"]))),  # whole seconds read better
        )
    return table


def _by_model(config: Config, key_id: str) -> dict[str, UsageTotals]:
    """The key's totals per model over what the ledger keeps (rotated files included)."""
    assert config.usage.ledger is not None
    return summarize_by_model(read_ledger(config.usage.ledger, key_id), config.engine.aliases)


def _totals(totals: UsageTotals) -> dict[str, int]:
    return {"requests": totals.requests, "prompt_tokens": totals.prompt_tokens,
            "completion_tokens": totals.completion_tokens,
            "total_tokens": totals.total_tokens}  # fmt: skip


def _models_table(key_id: str, models: dict[str, UsageTotals]) -> Table:
    table = Table(title=f"usage of {key_id} by model (usage ledger)")
    table.add_column("model")
    for column in ("requests", "prompt tokens", "completion tokens", "total tokens"):
        table.add_column(column, justify="right")
    for name, t in models.items():
        table.add_row(name, *(str(v) for v in _totals(t).values()))
    if not models:
        table.add_row("no requests", "", "", "", "")
    return table
