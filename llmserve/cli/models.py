"""`llmserve models`: model files without a hub (GGUF import, the default model), and LoRA
adapters loaded into a running server (`load`, `unload`: engine/served.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from llmserve.cli.admin_client import ServerUnreachable, api_key_option, post, url_option
from llmserve.cli.common import ConfigOption
from llmserve.engine.vllm_lora import adapter_path
from llmserve.models import DEFAULT_MODEL_DIR, ModelError, import_gguf, prepare_default_model

models_app = typer.Typer(
    help="Prepare model directories vLLM can load (no model hub needed); load and unload LoRA "
    "adapters in a running server."
)


@models_app.command("import")
def import_command(
    gguf: Annotated[Path, typer.Argument(help="A .gguf file (llama.cpp / Ollama format).")],
    out_dir: Annotated[
        Path, typer.Argument(help="Model directory to write (replaced if it exists).")
    ],
) -> None:
    """Convert a GGUF file into a model directory (bf16 safetensors, tokenizer, chat template)."""
    began = time.monotonic()
    try:
        import_gguf(gguf, out_dir)
    except ModelError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"wrote {out_dir} in {time.monotonic() - began:.1f} s")


@models_app.command("prepare")
def prepare_command(
    out_dir: Annotated[
        Path, typer.Option("--out", help="Where to write the model.")
    ] = DEFAULT_MODEL_DIR,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            "--cache", help="Download cache (default: ~/.cache/llmserve).", show_default=False
        ),
    ] = None,
) -> None:
    """Prepare the default model, SmolLM2-135M-Instruct (once; fast when already done)."""
    began = time.monotonic()
    try:
        path, converted = prepare_default_model(out_dir, cache_dir)
    except ModelError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if converted:
        typer.echo(f"prepared {path} in {time.monotonic() - began:.1f} s")
    else:
        typer.echo(f"{path} is ready")


@models_app.command("load")
def load_command(
    name: Annotated[str, typer.Argument(help="The model name clients will send.")],
    path: Annotated[
        str, typer.Argument(help="A PEFT adapter directory (or a hub id in the hub cache).")
    ],
    config: Path | None = ConfigOption,
    url: str | None = url_option(),
    api_key: str | None = api_key_option(),
) -> None:
    """Load a LoRA adapter into the running server as model NAME.

    It is served until `llmserve models unload` (a restart serves what the config file says).
    Exit 0 loaded, 1 refused (nothing changed, and why), 2 when the server cannot be reached."""
    body = {"name": name, "path": adapter_path(path)}  # a local path as this shell sees it
    _report(_post(config, url, api_key, "/admin/models/load", body))


@models_app.command("unload")
def unload_command(
    name: Annotated[str, typer.Argument(help="The adapter's model name.")],
    config: Path | None = ConfigOption,
    url: str | None = url_option(),
    api_key: str | None = api_key_option(),
) -> None:
    """Stop serving the LoRA adapter NAME in the running server.

    New requests for it get 404; those in flight finish on it. Exit 0 unloaded, 1 refused, 2
    when the server cannot be reached."""
    _report(_post(config, url, api_key, "/admin/models/unload", {"name": name}))


def _post(
    config: Path | None, url: str | None, api_key: str | None, path: str, body: dict[str, Any]
) -> dict[str, Any]:
    try:
        return post(config, url, api_key, path, body)
    except ServerUnreachable as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _report(answer: dict[str, Any]) -> None:
    if answer.get("result") in ("loaded", "unloaded"):
        typer.echo(answer.get("message", answer["result"]))
        return
    error = answer.get("error")
    message = error.get("message", answer) if isinstance(error, dict) else answer
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
