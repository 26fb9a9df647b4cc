"""`llmserve reload`: make the running server read its config file again."""

from __future__ import annotations

from pathlib import Path

import typer

from llmserve.cli.admin_client import ServerUnreachable, api_key_option, post, url_option
from llmserve.cli.common import ConfigOption

_EXIT = {"applied": 0, "unchanged": 0, "invalid": 1, "refused": 1}


def reload(
    config: Path | None = ConfigOption,
    url: str | None = url_option(),
    api_key: str | None = api_key_option(),
) -> None:
    """Ask the running server to re-read its config file and apply what needs no restart
    (tiers, limits, queue, auth, CORS, logging, timeouts, LoRA adapters and aliases). The same
    as sending it SIGHUP, but it says what happened: exit 0 applied (or unchanged), 1 invalid or
    refused (nothing changed), 2 when the server cannot be reached."""
    try:
        body = post(config, url, api_key, "/admin/reload")
    except ServerUnreachable as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    result = body.get("result")
    if result not in _EXIT:
        message = body.get("error", {}).get("message", body)
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(2)
    typer.echo(f"{result}: {body.get('message', '')}")
    raise typer.Exit(_EXIT[result])


def register(app: typer.Typer) -> None:
    app.command("reload")(reload)
