"""The `llmserve` command: a thin layer that parses, calls the library, and prints."""

from __future__ import annotations

import importlib

import typer

from llmserve import __version__

app = typer.Typer(
    name="llmserve",
    help="A production LLM API server: vLLM embedded, OpenAI-compatible, one YAML file.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each module has `register(app)`; importing them stays cheap (no vllm, no server code).
_COMMAND_MODULES = ("up", "worker", "reload", "check", "keys", "models", "bench", "top")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llmserve {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """llmserve: serve, administer, benchmark and watch an LLM API server."""


for _name in _COMMAND_MODULES:
    importlib.import_module(f"llmserve.cli.{_name}").register(app)


def main() -> None:
    app()
