"""`llmserve top [URL]`: a live terminal dashboard of a running server's /metrics."""

from __future__ import annotations

import contextlib

import typer
from rich.console import Console

DEFAULT_URL = "http://127.0.0.1:8000"


def top(
    url: str = typer.Argument(DEFAULT_URL, help="Base URL of the server."),
    interval: float = typer.Option(
        1.0, "--interval", "-i", min=0.25, help="Seconds between scrapes (+/- change it live)."
    ),
    once: bool = typer.Option(
        False, "--once", help="Print one snapshot (two scrapes, --interval apart) and exit."
    ),
    api_key: str | None = typer.Option(
        None,
        "--api-key",
        envvar="LLMSERVE_API_KEY",
        help="Admin key or token, when /metrics needs one.",
        show_default=False,
    ),
) -> None:
    """Watch a server live: load, KV cache, latency percentiles, rejections, busiest keys."""
    # Imported here so `llmserve --help` stays fast.
    from llmserve.top.loop import run_live, snapshot_once
    from llmserve.top.scrape import Scraper

    scraper = Scraper(url, api_key=api_key, timeout=max(1.0, min(interval, 5.0)))
    console = Console()
    if once:
        renderable, ok = snapshot_once(scraper, interval)
        console.print(renderable)
        raise typer.Exit(0 if ok else 1)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is a normal way to leave
        run_live(scraper, interval, console)


def register(app: typer.Typer) -> None:
    app.command("top")(top)
