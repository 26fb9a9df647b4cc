"""The live loop of `llmserve top`: scrape every interval, redraw, react to keys.

Keys: q quits, space pauses (scraping stops, the screen stays), + / - double / halve the interval.
A failed scrape shows "unreachable" and the loop simply tries again at the next tick.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO

from rich.console import Console, RenderableType
from rich.live import Live

from llmserve.top.scrape import Scrape, ScrapeError, Scraper
from llmserve.top.stats import History, Snapshot, summarize
from llmserve.top.view import ViewState, render_dashboard

MIN_INTERVAL, MAX_INTERVAL = 0.25, 60.0


class TopState:
    """The mutable side of the dashboard: last two scrapes, history, pause, interval."""

    def __init__(self, scraper: Scraper, interval: float) -> None:
        self.scraper = scraper
        self.interval = interval
        self.paused = False
        self.previous: Scrape | None = None
        self.history = History()
        self.snapshot: Snapshot | None = None
        self.error: str | None = None

    def step(self) -> None:
        try:
            current = self.scraper.scrape()
        except ScrapeError as exc:
            self.error = str(exc)
            return
        self.error = None
        if self.previous is not None:
            snapshot = self.snapshot = summarize(self.previous, current)
            self.history.add(snapshot)
        self.previous = current

    def view(self) -> ViewState:
        return ViewState(
            url=self.scraper.url,
            interval=self.interval,
            snapshot=self.snapshot,
            history=tuple(self.history.points),
            error=self.error,
            paused=self.paused,
        )

    def handle_key(self, key: str) -> bool:
        """Apply one key press; False means quit."""
        if key in ("q", "Q"):
            return False
        if key == " ":
            self.paused = not self.paused
        elif key in ("+", "="):
            self.interval = min(MAX_INTERVAL, self.interval * 2)
        elif key in ("-", "_"):
            self.interval = max(MIN_INTERVAL, self.interval / 2)
        return True


def snapshot_once(
    scraper: Scraper, interval: float, sleep: Callable[[float], None] = time.sleep
) -> tuple[RenderableType, bool]:
    """Two scrapes `interval` apart and their dashboard; the bool says both scrapes worked."""
    state = TopState(scraper, interval)
    state.step()
    if state.error is None:
        sleep(interval)
        state.step()
    return render_dashboard(state.view()), state.error is None


def run_live(scraper: Scraper, interval: float, console: Console) -> None:
    """Run until q (or Ctrl-C, which the caller handles)."""
    state = TopState(scraper, interval)
    state.step()
    next_at = time.monotonic() + state.interval
    with (
        _key_reader(sys.stdin) as read_key,
        Live(
            render_dashboard(state.view()), console=console, screen=True, auto_refresh=False
        ) as live,
    ):
        while True:
            key = read_key(max(0.0, next_at - time.monotonic()))
            if key is not None and not state.handle_key(key):
                return
            if time.monotonic() >= next_at:
                if not state.paused:
                    state.step()
                next_at = time.monotonic() + state.interval
            live.update(render_dashboard(state.view()), refresh=True)


def _sleep_without_key(timeout: float) -> str | None:
    time.sleep(timeout)
    return None


@contextlib.contextmanager
def _key_reader(stream: TextIO) -> Iterator[Callable[[float], str | None]]:
    """A function that waits up to `timeout` for one key press (None: no key, or no tty)."""
    if not stream.isatty():
        yield _sleep_without_key
        return
    import termios
    import tty

    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)  # keys arrive one by one, unechoed; Ctrl-C still interrupts

    def read_key(timeout: float) -> str | None:
        ready, _, _ = select.select([fd], [], [], timeout)
        return os.read(fd, 1).decode(errors="ignore") if ready else None

    try:
        yield read_key
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
