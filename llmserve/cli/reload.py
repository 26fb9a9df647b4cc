"""`llmserve reload`: make the running server read its config file again."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import typer
import yaml

from llmserve.cli.common import ConfigOption
from llmserve.config import resolve_config_path

_EXIT = {"applied": 0, "unchanged": 0, "invalid": 1, "refused": 1}
URL_HELP = "The server's base URL (default: from the config file, its admin listener if any)."


def reload(
    config: Path | None = ConfigOption,
    url: str | None = typer.Option(None, help=URL_HELP),
    api_key: str | None = typer.Option(
        None, envvar="LLMSERVE_API_KEY", help="An admin key, for the API port.", show_default=False
    ),
) -> None:
    """Ask the running server to re-read its config file and apply what needs no restart
    (tiers, limits, queue, auth, CORS, logging, timeouts). The same as sending it SIGHUP, but it
    says what happened: exit 0 applied (or unchanged), 1 invalid or refused (nothing changed),
    2 when the server cannot be reached."""
    target = (url or _base_url(config)).rstrip("/") + "/admin/reload"
    request = urllib.request.Request(target, data=b"", method="POST")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        body = _error_body(exc)
    except OSError as exc:
        typer.echo(f"error: cannot reach the server at {target}: {exc}", err=True)
        raise typer.Exit(2) from None
    result = body.get("result")
    if result not in _EXIT:
        message = body.get("error", {}).get("message", body)
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(2)
    typer.echo(f"{result}: {body.get('message', '')}")
    raise typer.Exit(_EXIT[result])


def _error_body(exc: urllib.error.HTTPError) -> dict[str, Any]:
    try:
        body: dict[str, Any] = json.loads(exc.read())
        return body
    except ValueError:
        return {"error": {"message": f"HTTP {exc.code}"}}


def _base_url(config: Path | None) -> str:
    """The server's address from the config file, read leniently: the file may be the invalid
    one the server is about to refuse."""
    path = resolve_config_path(config)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        server = data.get("server") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        server = {}
    if server.get("admin_port"):
        host = str(server.get("admin_host") or "127.0.0.1")
        return f"http://{_local(host)}:{int(server['admin_port'])}"
    host = str(server.get("host") or "127.0.0.1")
    return f"http://{_local(host)}:{int(server.get('port') or 8000)}"


def _local(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def register(app: typer.Typer) -> None:
    app.command("reload")(reload)


