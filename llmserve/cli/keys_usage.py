"""`llmserve keys usage ID`: a key's usage and remaining quota per window, from the store."""

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
from llmserve.errors import LLMServeError
from llmserve.limits.headers import format_duration
from llmserve.limits.usage import read_usage, usage_record
from llmserve.limits.windows import WindowStatus


def add_usage_command(keys_app: typer.Typer) -> None:
    keys_app.command("usage")(usage)


def usage(
    key_id: str = typer.Argument(..., help="The key's id (as `keys list` shows it)."),
    as_json: bool = typer.Option(False, "--json", help="Print the windows as JSON."),
    config_path: Path | None = ConfigOption,
) -> None:
    """Show a key's current usage, remaining quota and reset time per rate-limit window."""
    config = load_or_exit(config_path)

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
    if as_json:
        typer.echo(json.dumps({"id": record.id, "tier": record.tier, "windows": records}))
        return
    if not records:
        typer.echo(f"{record.id}: its tier has no limits")
        return
    Console().print(_table(record.id, records))


def _table(key_id: str, records: list[dict[str, Any]]) -> Table:
    table = Table(title=f"usage of {key_id}")
    for column in ("window", "limit", "used", "remaining", "resets in"):
        table.add_column(column, justify="left" if column == "window" else "right")
    for r in records:
        table.add_row(
            str(r["label"]),
            str(r["limit"]),
            str(r["used"]),
            str(r["remaining"]),
            format_duration(math.ceil(float(r["reset_seconds"]))),  # whole seconds read better
        )
    return table
