"""The reaper: when the server dies, however it dies, the processes it started die with it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmserve.engine.reaper import ProcessId, alive, read_stat

REPO = Path(__file__).resolve().parents[1]

# A stand-in for `llmserve up`: starts its reaper, then a child that starts a grandchild (as
# vLLM's engine core starts tensor-parallel workers), prints their pids, and waits.
SERVER = """
import subprocess, sys, time
from llmserve.engine.reaper import Reaper
reaper = Reaper.start(interval=0.1)
child = subprocess.Popen([sys.executable, "-c", '''
import subprocess, sys, time
grandchild = subprocess.Popen(["sleep", "300"])
print(grandchild.pid, flush=True)
time.sleep(300)
'''], stdout=subprocess.PIPE, text=True)
grandchild = child.stdout.readline().strip()
time.sleep(0.5)  # the reaper has looked (vLLM's processes start seconds after it, not at once)
print(reaper.process.pid, child.pid, grandchild, flush=True)
if sys.argv[1] == "clean":
    reaper.stop()
    print("stopped", flush=True)
time.sleep(300)
"""


def identify(pid: int) -> ProcessId:
    stat = read_stat(pid)
    assert stat is not None, f"process {pid} is not running"
    return ProcessId(pid, stat[2])


def wait_gone(processes: list[ProcessId], timeout: float) -> list[ProcessId]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in processes if alive(p)]
        if not left:
            return []
        time.sleep(0.05)
    return [p for p in processes if alive(p)]


@pytest.fixture
def server_family() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:  # whatever the test did: nothing is left behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def start_server(mode: str, family: list[subprocess.Popen[str]]) -> tuple[
    subprocess.Popen[str], ProcessId, list[ProcessId]
]:  # fmt: skip
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, mode], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
    )  # fmt: skip
    family.append(server)
    assert server.stdout is not None
    reaper, child, grandchild = (int(p) for p in server.stdout.readline().split())
    return server, identify(reaper), [identify(child), identify(grandchild)]


def test_a_sigkilled_servers_processes_are_killed_by_its_reaper(
    server_family: list[subprocess.Popen[str]],
) -> None:
    server, reaper, engine = start_server("kill", server_family)
    os.kill(server.pid, signal.SIGKILL)  # the server only: nothing can shut its children down
    server.wait(5)
    assert wait_gone(engine, timeout=5) == [], "the server's processes outlived it"
    assert wait_gone([reaper], timeout=5) == [], "the reaper outlived its work"


def test_a_server_that_stops_cleanly_stops_its_reaper_without_killing_anything(
    server_family: list[subprocess.Popen[str]],
) -> None:
    server, reaper, engine = start_server("clean", server_family)
    assert server.stdout is not None and server.stdout.readline().strip() == "stopped"
    assert wait_gone([reaper], timeout=5) == []
    time.sleep(0.3)  # three of the reaper's intervals: had it been running, it would have acted
    assert all(alive(p) for p in engine)


def test_a_reused_pid_is_not_taken_for_the_process_that_had_it() -> None:
    me = identify(os.getpid())
    assert alive(me)
    assert not alive(ProcessId(me.pid, me.start + 1))
