"""No engine process outlives the server, whatever ends it.

vLLM runs its engine core (and tensor- or data-parallel workers) in child processes. A server
that stops normally shuts them down; one that is SIGKILLed or OOM-killed cannot, and measured
here, `VLLM::EngineCore` then lives on for good, holding its memory (GPU memory on a GPU box).

The reaper is a small process in a session of its own, started before the engine. Every
`interval` seconds it notes the server's descendants (pid and start time, so a reused pid is
never mistaken for one of them). When the server is gone (no such process, or a zombie), it
SIGKILLs the descendants it noted that still run, and theirs, then exits. A server that stops
cleanly stops its reaper after the engine, and nothing is killed.

    reaper = Reaper.start()   # in the server, before the engine's processes exist
    ...
    reaper.stop()             # after the engine has shut down

Run as `python -m llmserve.engine.reaper SERVER_PID SERVER_START INTERVAL` (what start does).
Linux only (it reads /proc); elsewhere start returns None.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
DEFAULT_INTERVAL = 0.5  # seconds between looks; an orphan lives at most about this long


@dataclass(frozen=True, slots=True)
class ProcessId:
    """A process, told apart from a later one that reuses its pid."""

    pid: int
    start: int  # clock ticks after boot (/proc/PID/stat field 22)


def read_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a process, or None when it does not exist."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # the command name may hold spaces and parens
    return fields[0], int(fields[1]), int(fields[19])


def alive(process: ProcessId) -> bool:
    stat = read_stat(process.pid)
    return stat is not None and stat[0] not in ("Z", "X") and stat[2] == process.start


def children(pid: int) -> list[int]:
    """The pids of a process's children (every thread's), from /proc."""
    found: list[int] = []
    try:
        threads = list((PROC / str(pid) / "task").iterdir())
    except OSError:
        return found
    for thread in threads:
        with contextlib.suppress(OSError, ValueError):
            found += [int(p) for p in (thread / "children").read_text().split()]
    return found


def descendants(pid: int, exclude: int = -1) -> list[ProcessId]:
    """Every process below `pid` (children, theirs, ...), as of now."""
    out: list[ProcessId] = []
    todo = [pid]
    while todo:
        for child in children(todo.pop()):
            stat = read_stat(child)
            if child == exclude or stat is None:
                continue
            out.append(ProcessId(child, stat[2]))
            todo.append(child)
    return out


def watch(server: ProcessId, interval: float) -> list[ProcessId]:
    """Wait for the server to end; return what of its descendants must be killed."""
    me = os.getpid()
    noted: dict[int, ProcessId] = {}
    while alive(server):
        # keep what was noted: a child orphaned early is no longer below the server
        noted.update({p.pid: p for p in descendants(server.pid, exclude=me)})
        noted = {pid: p for pid, p in noted.items() if alive(p)}
        time.sleep(interval)
    targets = {p.pid: p for p in noted.values() if alive(p)}
    for process in list(targets.values()):
        targets.update({p.pid: p for p in descendants(process.pid, exclude=me)})
    return list(targets.values())


def kill_all(targets: list[ProcessId]) -> int:
    killed = 0
    for process in targets:
        if alive(process):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(process.pid, signal.SIGKILL)
                killed += 1
    return killed


class Reaper:
    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process

    @classmethod
    def start(cls, interval: float = DEFAULT_INTERVAL) -> Reaper | None:
        me = read_stat(os.getpid())
        if me is None:  # no /proc: not Linux
            return None
        command = [sys.executable, "-m", "llmserve.engine.reaper",
                   str(os.getpid()), str(me[2]), str(interval)]  # fmt: skip
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # no terminal signal or process-group kill reaches it
            close_fds=True,
        )
        return cls(process)

    def stop(self) -> None:
        """The server is stopping cleanly and its engine is down: nothing to kill."""
        with contextlib.suppress(ProcessLookupError):
            self.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def main(argv: list[str]) -> int:
    pid, start, interval = int(argv[0]), int(argv[1]), float(argv[2])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    targets = watch(ProcessId(pid, start), interval)
    killed = kill_all(targets)
    if killed:
        print(f"llmserve reaper: the server (pid {pid}) died; killed {killed} of its "
              "processes it left behind", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
