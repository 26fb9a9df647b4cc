"""The CLI's way to the running server's operator routes (`llmserve reload`, `llmserve models
load/unload`): the admin listener when the config file has one, else the API port with an admin
key (`--api-key` or $LLMSERVE_API_KEY)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import typer
import yaml

from llmserve.config import resolve_config_path

URL_HELP = "The server's base URL (default: from the config file, its admin listener if any)."
API_KEY_HELP = "An admin key, for the API port."


class ServerUnreachable(Exception):
    """No answer from the server (the message says where it was asked)."""


def url_option() -> Any:
    return typer.Option(None, "--url", help=URL_HELP)


def api_key_option() -> Any:
    return typer.Option(None, "--api-key", envvar="LLMSERVE_API_KEY", help=API_KEY_HELP,
                        show_default=False)  # fmt: skip


def post(
    config: Path | None, url: str | None, api_key: str | None, path: str,
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """POST `body` (JSON; none: an empty body) to the server's `path`; its JSON answer, an
    error's (`{"error": {...}}`) included. ServerUnreachable when nothing answers."""
    target = (url or base_url(config)).rstrip("/") + path
    data = b"" if body is None else json.dumps(body).encode()
    request = urllib.request.Request(target, data=data, method="POST")
    if body is not None:
        request.add_header("Content-Type", "application/json")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            answer: dict[str, Any] = json.loads(response.read())
            return answer
    except urllib.error.HTTPError as exc:
        return error_body(exc)
    except OSError as exc:
        raise ServerUnreachable(f"cannot reach the server at {target}: {exc}") from None


def error_body(exc: urllib.error.HTTPError) -> dict[str, Any]:
    try:
        body: dict[str, Any] = json.loads(exc.read())
        return body
    except ValueError:
        return {"error": {"message": f"HTTP {exc.code}"}}


def base_url(config: Path | None) -> str:
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
