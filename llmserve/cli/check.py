"""`llmserve check`: validate a config file and print the effective config (secrets masked)."""

from __future__ import annotations

from pathlib import Path

import typer
import yaml

from llmserve.cli.common import ConfigOption, load_or_exit
from llmserve.config import effective_config, resolve_config_path


def check(config: Path | None = ConfigOption) -> None:
    """Validate the config file; print the effective config with every default filled in.

    Exits 2 and names the file, the setting and what was expected when something is wrong.
    """
    cfg = load_or_exit(config)
    typer.echo(f"# {resolve_config_path(config)}: OK", err=True)
    typer.echo(yaml.safe_dump(effective_config(cfg), sort_keys=False).rstrip())


def register(app: typer.Typer) -> None:
    app.command("check")(check)
