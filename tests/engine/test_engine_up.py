"""A real `llmserve up` process on the tiny model: the official openai client, then SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_SECONDS = 240


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(directory: Path, model: Path, port: int) -> Path:
    path = directory / "llmserve.yaml"
    path.write_text(
        f"""
server: {{host: 127.0.0.1, port: {port}, public_ready: true, shutdown_grace_seconds: 5}}
engine:
  model: {model}
  served_model_name: tiny
  max_model_len: 512
  cpu_kv_cache_bytes: 256MiB
auth: {{enabled: false}}
usage: {{ledger: null}}
"""
    )
    return path


def is_ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def group_members(pgid: int) -> list[str]:
    import psutil

    members = []
    for process in psutil.process_iter(["pid", "name"]):
        try:
            if os.getpgid(process.pid) == pgid:
                members.append(f"{process.pid} {process.info['name']}")
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SimpleNamespace]:
    """`python -m llmserve up` in its own session (process group), killed as a group at the end."""
    workdir = tmp_path_factory.mktemp("up")
    port = free_port()
    config = write_config(workdir, tiny_model_dir, port)
    log = (workdir / "server.log").open("w")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmserve", "up", "--config", str(config)],
        cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        began = time.monotonic()
        while not is_ready(port):
            if proc.poll() is not None or time.monotonic() - began > START_TIMEOUT_SECONDS:
                tail = (workdir / "server.log").read_text()[-3000:]
                pytest.fail(f"llmserve up did not become ready (exit {proc.poll()}):\n{tail}")
            time.sleep(0.2)
        yield SimpleNamespace(proc=proc, port=port, log=workdir / "server.log",
                              start_seconds=time.monotonic() - began)  # fmt: skip
    finally:
        kill_group(proc.pid)
        proc.wait(timeout=30)
        log.close()


def test_official_openai_client_streams_from_llmserve_up(server) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none", max_retries=0)
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hello!"}],
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    usage = chunks[-1].usage
    assert text
    assert finish in (["stop"], ["length"])
    assert usage is not None and 1 <= usage.completion_tokens <= 10
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_sigterm_stops_the_server_and_leaves_no_process_of_its_group(server) -> None:
    pgid = server.proc.pid
    assert len(group_members(pgid)) >= 2  # the server and its vLLM engine core
    began = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(timeout=60)
    stop_seconds = time.monotonic() - began
    # multiprocessing's resource tracker exits when it sees its parent's pipe close: give
    # processes that are already on their way out a moment, but no orphan can pass this.
    deadline = time.monotonic() + 5
    while (left := group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    kill_group(pgid)
    assert code == 0, server.log.read_text()[-2000:]
    assert not left, f"left behind after SIGTERM: {left}"
    print(f"llmserve up: ready after {server.start_seconds:.1f} s, stopped in {stop_seconds:.1f} s")
