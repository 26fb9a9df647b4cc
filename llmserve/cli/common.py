"""Helpers shared by the CLI commands: loading the config and turning errors into exits."""

from __future__ import annotations

from pathlib import Path

import typer

from llmserve.config import Config, load_config
from llmserve.errors import ConfigError

CONFIG_HELP = "Config file (default: $LLMSERVE_CONFIG, else ./llmserve.yaml)."

ConfigOption = typer.Option(None, "--config", "-c", help=CONFIG_HELP, show_default=False)


def load_or_exit(path: Path | None) -> Config:
    """Load the config; on error print the message to stderr and exit 2."""
    try:
        return load_config(path)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
