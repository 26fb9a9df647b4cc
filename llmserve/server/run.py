"""Run the server: listen, handle SIGTERM/SIGINT, drain, close the engine, return an exit code.

Exit codes: 0 after a signal-initiated shutdown; 1 when the engine failed to start or died (so a
supervisor such as systemd or Kubernetes restarts the process).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from llmserve.app_state import GATEWAY, LIFECYCLE, METRICS, RELOADER
from llmserve.config import Config
from llmserve.server.app import ENGINE_START
from llmserve.server.components import Components, build_components
from llmserve.server.heap import collect_every, freeze_heap, tune_collector
from llmserve.server.http import AppRunner
from llmserve.server.reload import Reloader
from llmserve.server.watch import watching

log = logging.getLogger("llmserve.server")

FORCED_STOP_SECONDS = 5.0  # after the grace time: how long cancelled requests get to end
ENGINE_WATCH_SECONDS = 0.5


async def serve(
    config: Config, source: Path | None = None, overrides: Mapping[str, Any] | None = None
) -> int:
    """Run until a signal or an engine failure. `source`: the config file, read again on
    SIGHUP or POST /admin/reload (server/reload.py), and when it changes if
    `server.watch_config` (server/watch.py); `overrides`: server settings given on the
    command line, kept across reloads."""
    components = build_components(config)
    reloader = Reloader(components.app, config, source, dict(overrides or {}))
    for app in (components.app, components.admin_app):
        if app is not None:
            app[RELOADER] = reloader
    metrics = components.app.get(METRICS)
    if metrics is not None:
        metrics.config_loaded(reloader.sha256)
    if config.server.gc_collect_seconds > 0:
        components.app.cleanup_ctx.append(_collecting(config.server.gc_collect_seconds))
    if config.server.watch_config and source is not None:
        components.app.cleanup_ctx.append(watching(reloader, source))
    runner = AppRunner(
        components.app,
        header_read_timeout=config.server.header_read_timeout_seconds,
        keepalive_timeout=config.server.keepalive_timeout_seconds,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=1.0,
    )
    await runner.setup()
    components.app[ENGINE_START].add_done_callback(
        functools.partial(_tune_once_started, config.server.gc_freeze,
                          config.server.gc_gen0_threshold)
    )  # fmt: skip
    admin_runner: web.AppRunner | None = None
    try:
        admin_runner = await _start_sites(runner, components, config)
        exit_code = await _wait_for_end(components.app)
        await _drain(runner, components.app, config.server.shutdown_grace_seconds)
    finally:
        if admin_runner is not None:
            await admin_runner.cleanup()
        await runner.cleanup()  # the app's cleanup_ctx: engine, then everything it owns
    log.info("stopped (exit code %d)", exit_code)
    return exit_code


def _collecting(seconds: float) -> Callable[[web.Application], AsyncIterator[None]]:
    """A full garbage collection every `seconds` while the app runs (heap.py)."""

    async def collector(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(collect_every(seconds))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return collector


def _tune_once_started(freeze: bool, gen0_threshold: int, start: asyncio.Task[None]) -> None:
    """Once the engine is up (heap.py): what exists then lives as long as the process, so freeze
    it; and from then on leave the collector's passes to the periodic collection. Not before:
    processes the engine starts must not inherit the tuned threshold without that collection."""
    if start.cancelled() or start.exception() is not None:
        return
    if freeze:
        log.debug("froze %d objects", freeze_heap())
    tune_collector(gen0_threshold)


async def _start_sites(
    runner: web.AppRunner, components: Components, config: Config
) -> web.AppRunner | None:
    """Start listening; return the admin listener's runner, if there is one."""
    site = web.TCPSite(runner, config.server.host, config.server.port)
    await site.start()
    for address in _addresses(runner):
        log.info("listening on http://%s:%s", *address[:2])
    if components.admin_app is not None and config.server.admin_port is not None:
        admin_runner = AppRunner(
            components.admin_app,
            header_read_timeout=config.server.header_read_timeout_seconds,
            keepalive_timeout=config.server.keepalive_timeout_seconds,
            access_log=None,
        )
        await admin_runner.setup()
        try:
            await web.TCPSite(admin_runner, config.server.admin_host,
                              config.server.admin_port).start()  # fmt: skip
        except BaseException:
            await admin_runner.cleanup()
            raise
        log.info("admin endpoints on http://%s:%d", config.server.admin_host,
                 config.server.admin_port)  # fmt: skip
        return admin_runner
    return None


def _addresses(runner: web.AppRunner) -> list[tuple[str, int]]:
    return [(str(a[0]), int(a[1])) for a in runner.addresses]


async def _wait_for_end(app: web.Application) -> int:
    """Block until a signal (exit 0) or an engine failure (exit 1); SIGHUP reloads the config."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[object]] = set()
    reloader = app.get(RELOADER)
    if reloader is not None:
        def on_sighup() -> None:
            task: asyncio.Task[object] = loop.create_task(reloader.reload())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_sighup)
    watcher = asyncio.create_task(_watch_engine(app))
    signalled = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({watcher, signalled}, return_when=asyncio.FIRST_COMPLETED)
    for task in (watcher, signalled):
        task.cancel()
    if signalled in done:
        log.info("signal received: draining")
        return 0
    return 1


async def _watch_engine(app: web.Application) -> None:
    """Return when the engine failed to start or died for good."""
    gateway = app[GATEWAY]
    start = app[ENGINE_START]
    while True:
        if start.done() and not start.cancelled() and start.exception() is not None:
            log.error("the engine failed to start: %s", start.exception(),
                      exc_info=start.exception())  # fmt: skip
            return
        if gateway.engine.dead is not None:
            log.error("the engine died: %s", gateway.engine.dead, exc_info=gateway.engine.dead)
            return
        await asyncio.sleep(ENGINE_WATCH_SECONDS)


async def _drain(runner: web.AppRunner, app: web.Application, grace: float) -> None:
    lifecycle = app[LIFECYCLE]
    lifecycle.draining = True
    admission = app[GATEWAY].admission
    if admission is not None:
        admission.close()  # waiting requests get 503 shutting_down; running ones finish
    for site in list(runner.sites):
        await site.stop()  # no new connections; open ones get 503 shutting_down
    if lifecycle.in_flight:
        log.info("waiting up to %.0fs for %d request(s)", grace, lifecycle.in_flight)
    if not await lifecycle.wait_idle(grace):
        app[GATEWAY].force_stopping = True
        count = lifecycle.cancel_all()
        log.warning("grace time over: ending %d request(s)", count)
        with contextlib.suppress(Exception):
            await lifecycle.wait_idle(FORCED_STOP_SECONDS)
