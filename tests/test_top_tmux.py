"""`llmserve top` in a real terminal (tmux) against a small server replaying recorded scrapes."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent
LLMSERVE = [sys.executable, "-m", "llmserve"]

pytestmark = [
    pytest.mark.tmux,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux"),
]


class ReplayServer:
    """Serves top_scrape_1.txt to the first /metrics request, top_scrape_2.txt afterwards."""

    def __init__(self) -> None:
        self.scrapes = 0
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _metrics(self, request: web.Request) -> web.Response:
        self.scrapes += 1
        name = "top_scrape_1.txt" if self.scrapes == 1 else "top_scrape_2.txt"
        return web.Response(body=(DATA / name).read_bytes(), content_type="text/plain")

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def _run(self) -> None:
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def __enter__(self) -> ReplayServer:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


class Tmux:
    def __init__(self) -> None:
        self.session = f"llmserve-top-{uuid.uuid4().hex[:8]}"

    def start(self, command: list[str]) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("LLMSERVE_API_KEY", None)
        subprocess.run(
            ["tmux", "new-session", "-d", "-s", self.session, "-x", "130", "-y", "50",
             *(f"-e{k}={v}" for k, v in env.items() if k in ("PYTHONPATH", "PATH")),
             "env -u COLUMNS -u LINES " + " ".join(command)],
            check=True, cwd=ROOT,
        )  # fmt: skip

    def screen(self) -> str:
        return subprocess.run(
            ["tmux", "capture-pane", "-p", "-t", self.session],
            capture_output=True, text=True, check=False,
        ).stdout  # fmt: skip

    def keys(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.session, *keys], check=True)

    def alive(self) -> bool:
        return subprocess.run(["tmux", "has-session", "-t", self.session],
                              capture_output=True, check=False).returncode == 0  # fmt: skip

    def wait_for(self, text: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        previous = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if text in screen and screen == previous:  # the same twice: not caught mid-redraw
                return screen
            previous = screen
            time.sleep(0.05)
        raise AssertionError(f"{text!r} never appeared; screen:\n{self.screen()}")

    def kill(self) -> None:
        subprocess.run(
            ["tmux", "kill-session", "-t", self.session], capture_output=True, check=False
        )


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    session = Tmux()
    try:
        yield session
    finally:
        session.kill()  # also ends `llmserve top` (SIGHUP to the pane's process group)


def test_top_in_a_real_terminal_shows_the_servers_numbers(tmux: Tmux) -> None:
    with ReplayServer() as server:
        tmux.start([*LLMSERVE, "top", server.url, "--interval", "2"])
        tmux.wait_for("483 ms")  # TTFT p95 appears after the second scrape
        tmux.keys("Space")  # pause so the screen stays on these two scrapes
        screen = tmux.wait_for("PAUSED")
        assert "model smollm2" in screen and "health ok" in screen
        assert "85.0%" in screen and "5 / 64" in screen and "12 / 16" in screen
        assert "329 ms" in screen and "497 ms" in screen
        assert "429 tokens_per_minute" in screen
        assert "alice" in screen and "bob" in screen
        lora = next(line for line in screen.splitlines() if "smollm2-lora-a" in line)
        assert re.search(r"smollm2-lora-a +\d+ +[\d.]+ +2,760", lora), lora  # usage by model
        assert "Traceback" not in screen
        tmux.keys("q")
        deadline = time.monotonic() + 10
        while tmux.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not tmux.alive(), "q did not quit"


def test_top_shows_an_unreachable_server_and_keeps_retrying(
    tmux: Tmux, unused_tcp_port: int
) -> None:
    tmux.start([*LLMSERVE, "top", f"http://127.0.0.1:{unused_tcp_port}", "--interval", "0.25"])
    screen = tmux.wait_for("unreachable")
    assert "retrying" in screen and "Traceback" not in screen
    time.sleep(1.0)  # several retries later it is still running and still says so
    assert tmux.alive() and "unreachable" in tmux.screen()


def test_top_once_prints_one_snapshot_and_exits() -> None:
    with ReplayServer() as server:
        result = subprocess.run(
            [*LLMSERVE, "top", server.url, "--once", "--interval", "0.5"],
            capture_output=True, text=True, timeout=30, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "130"},
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert server.scrapes == 2
    assert "483 ms" in result.stdout and "85.0%" in result.stdout


def test_top_once_against_nothing_exits_1_without_traceback(unused_tcp_port: int) -> None:
    result = subprocess.run(
        [*LLMSERVE, "top", f"http://127.0.0.1:{unused_tcp_port}", "--once"],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 1
    assert "unreachable" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_top_in_a_real_terminal_against_a_live_llmserve(tmux: Tmux, tmp_path: Path) -> None:
    import httpx

    from tests.support.process import llmserve_up

    config = {
        "server": {"public_metrics": True},
        "engine": {"kind": "fake", "served_model_name": "livefake", "max_model_len": 512},
        "auth": {"enabled": False, "keys": str(tmp_path / "keys")},
        "limits": {"state_dir": str(tmp_path / "limits"), "default_tier": "t",
                   "tiers": {"t": {"requests_per_minute": 4}}},
        "usage": {"ledger": None},
    }  # fmt: skip
    body = {"model": "livefake", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3}
    with llmserve_up(tmp_path, config, ready_path="/ready") as server:
        statuses = [
            httpx.post(server.base_url + "/v1/chat/completions", json=body).status_code
            for _ in range(7)
        ]
        assert statuses == [200] * 4 + [429] * 3
        tmux.start([*LLMSERVE, "top", server.base_url, "--interval", "0.5"])
        screen = tmux.wait_for("429 requests_per_minute")
        assert "model livefake" in screen and "health ok" in screen
        row = next(line for line in screen.splitlines() if "429 requests_per_minute" in line)
        counts = re.findall(r"\d+", row.split("requests_per_minute", 1)[1])
        assert counts[-1] == "3", row  # the total of 429s the server counted
        assert "Traceback" not in screen
