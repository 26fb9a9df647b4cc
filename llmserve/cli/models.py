"""`llmserve models`: model files without a hub (GGUF import, the default model)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from llmserve.models import DEFAULT_MODEL_DIR, ModelError, import_gguf, prepare_default_model

models_app = typer.Typer(help="Prepare model directories vLLM can load (no model hub needed).")


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


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
