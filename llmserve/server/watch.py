"""Reload the config when its file changes (`server.watch_config`).

    app.cleanup_ctx.append(watching(reloader, Path("llmserve.yaml")))

Once a second the file is read and hashed: a config file is small, and a modification time can
be too coarse to tell two edits within a second apart. A reload starts when the content

- differs from the content that is live and from the content last tried, so that a file that
  does not validate is reported once per edit, not once a second;
- reads the same on two polls in a row, so that a file written in two steps is read settled.

The path is read at each poll, whatever file it names by then: editors save by renaming a new
file over the old one, and a Kubernetes ConfigMap swaps a symlink. A file that is missing or
unreadable for a while (some editors move the old file away before writing the new one) changes
nothing, and is read again when it is back. The reload is the Reloader's (server/reload.py): the
same lock, outcomes, log lines and `llmserve_config_reloads_total{result}` as SIGHUP.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from aiohttp import web

log = logging.getLogger("llmserve.reload")

WATCH_SECONDS = 1.0  # between two reads of the file


class Reloads(Protocol):
    """What the watcher needs of the Reloader (a fake in the tests)."""

    @property
    def sha256(self) -> str:
        """The digest of the file content that is live."""
        ...

    async def reload(self) -> object: ...


@dataclass
class ChangeDetector:
    """Decides, poll by poll, whether the file's content calls for a reload (no I/O)."""

    tried: str  # digest of the content last tried, or found live
    pending: str | None = None  # a new digest seen once: reload if the next poll sees it again

    def observe(self, digest: str | None, live: str) -> bool:
        """`digest`: the file's content now (None: missing or unreadable); `live`: the
        running config's. True when a reload should start now."""
        if digest is None or digest in (live, self.tried):
            if digest is not None:
                self.tried = digest  # so that going back to a broken edit reports it again
            self.pending = None
            return False
        if digest != self.pending:
            self.pending = digest
            return False
        self.tried, self.pending = digest, None
        return True


def file_digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


async def watch_file(
    reloader: Reloads,
    path: Path,
    interval: float = WATCH_SECONDS,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Poll `path` forever (until cancelled), reloading as ChangeDetector decides."""
    detector = ChangeDetector(tried=reloader.sha256)
    present = True
    while True:
        await sleep(interval)
        digest = await asyncio.to_thread(file_digest, path)  # a network disk may be slow
        if present != (digest is not None):
            present = digest is not None
            _log_presence(path, present)
        if detector.observe(digest, reloader.sha256):
            log.info("config file %s changed: reloading", path)
            await _reload(reloader)


def _log_presence(path: Path, present: bool) -> None:
    if present:
        log.info("config file %s is readable again", path)
    else:
        log.warning("config file %s is missing or unreadable: nothing changes; still watching",
                    path)  # fmt: skip


async def _reload(reloader: Reloads) -> None:
    try:
        await reloader.reload()  # logs and counts its outcome
    except Exception:  # a component failing to take its settings must not end the watching
        log.exception("config reload failed")


def watching(reloader: Reloads, path: Path) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup_ctx entry: watch `path` while the app runs."""

    async def watcher(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(watch_file(reloader, path))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return watcher
