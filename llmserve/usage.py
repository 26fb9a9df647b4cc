"""The usage ledger: one JSON line per finished generation request, rotated by size.

Durability policy: `append` hands each line to the kernel at once with one `os.write` on an
O_APPEND descriptor (no user-space buffer), so a record whose `append` returned survives any
crash of the server process, SIGKILL included. Surviving a power loss needs an fsync, which costs
milliseconds and would stall the event loop if done per request; a background thread fsyncs at
most every `fsync_seconds` when something was written (0 = fsync inside every `append`). A torn
last line (power loss mid-write) is skipped by the reader.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from llmserve.config import UsageConfig
from llmserve.records import RequestRecord

log = logging.getLogger(__name__)

_encode = json.JSONEncoder(separators=(",", ":")).encode
USAGE_ROUTES = frozenset({"chat", "completions"})  # health checks and scrapes are not usage


@dataclass(frozen=True, slots=True)
class UsageEntry:
    time: float  # epoch seconds when the request started
    request_id: str
    principal_id: str | None
    tier: str | None
    model: str | None
    route: str
    status: int
    error_code: str | None
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    queue_wait_seconds: float | None
    ttft_seconds: float | None
    total_seconds: float
    disconnected: bool
    metadata: dict[str, str] | None = None  # the request's OpenAI `metadata`
    shadow_refused: str | None = None  # the shadow window that would have refused it

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class UsageLedger:
    """Appends usage entries to `path`; at `max_bytes` it becomes `path.1` (up to `backups`)."""

    def __init__(
        self, path: str | os.PathLike[str], max_bytes: int, backups: int, fsync_seconds: float = 1.0
    ) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.fsync_seconds = fsync_seconds
        self._lock = threading.Lock()  # rotation vs the fsync thread's dup of the descriptor
        self._dirty = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = self._open()
        self._size = os.fstat(self._fd).st_size
        self._end_torn_line()
        self._stop = threading.Event()
        self._syncer: threading.Thread | None = None
        if fsync_seconds > 0:
            self._syncer = threading.Thread(target=self._sync_loop, name="usage-fsync", daemon=True)
            self._syncer.start()

    def _end_torn_line(self) -> None:
        """A crash mid-write leaves a last line without its newline: end it, so the next record
        starts on a line of its own (readers skip the torn one)."""
        if not self._size:
            return
        with open(self.path, "rb") as existing:
            existing.seek(-1, os.SEEK_END)
            torn = existing.read(1) != b"\n"
        if torn:
            os.write(self._fd, b"\n")
            self._size += 1

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def append(self, record: RequestRecord) -> None:
        """Write one request's entry (generation routes only); returns once the OS has it."""
        if record.route not in USAGE_ROUTES:
            return
        line = _line(record)
        with self._lock:
            if self._size and self._size + len(line) > self.max_bytes:
                self._rotate()
            os.write(self._fd, line)
            self._size += len(line)
            self._dirty = True
            if self.fsync_seconds == 0:
                os.fsync(self._fd)
                self._dirty = False

    def _rotate(self) -> None:
        """Move the full file aside and continue in a new one. Whatever fails on the way (the
        file was moved by someone else, a full disk), the ledger ends up with an open file of
        its own, and it closes only the descriptor it owns."""
        try:
            os.fsync(self._fd)
            with contextlib.suppress(FileNotFoundError):
                self._shift_backups()
        finally:
            old, self._fd = self._fd, self._open()
            os.close(old)
            self._size = os.fstat(self._fd).st_size

    def _shift_backups(self) -> None:
        if self.backups == 0:
            self.path.unlink()
            return
        for i in range(self.backups - 1, 0, -1):
            older = _backup(self.path, i)
            if older.exists():
                older.replace(_backup(self.path, i + 1))
        self.path.replace(_backup(self.path, 1))

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.fsync_seconds):
            self.sync()

    def sync(self) -> None:
        """fsync what was written; the descriptor is dup'ed so the slow part runs unlocked."""
        with self._lock:
            if not self._dirty:
                return
            self._dirty = False
            fd = os.dup(self._fd)
        try:
            os.fsync(fd)
        except OSError:
            log.warning("usage ledger fsync failed", exc_info=True)
        finally:
            os.close(fd)

    def close(self) -> None:
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join()
        with self._lock:
            if self._fd < 0:
                return
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> UsageLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _line(record: RequestRecord) -> bytes:
    """One ledger line: UsageEntry's fields, read straight off the record (no entry object in
    between: this runs once per request)."""
    r = record
    return (_encode({
        "time": r.started_at, "request_id": r.request_id, "principal_id": r.principal_id,
        "tier": r.tier, "model": r.model, "route": r.route, "status": r.status,
        "error_code": r.error_code, "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens, "finish_reason": r.finish_reason,
        "queue_wait_seconds": r.queue_wait_seconds, "ttft_seconds": r.ttft_seconds,
        "total_seconds": r.total_seconds, "disconnected": r.disconnected,
        "metadata": r.metadata, "shadow_refused": r.shadow_refused,
    }) + "\n").encode()  # fmt: skip


def _backup(path: Path, index: int) -> Path:
    return path.with_name(f"{path.name}.{index}")


def ledger_files(path: str | os.PathLike[str]) -> list[Path]:
    """The ledger's files, oldest first (path.N ... path.1, path)."""
    base = Path(path)
    backups = sorted(
        (p for p in base.parent.glob(f"{base.name}.*") if p.suffix[1:].isdigit()),
        key=lambda p: int(p.suffix[1:]),
        reverse=True,
    )
    return [*backups, base] if base.exists() else backups


def read_usage(
    path: str | os.PathLike[str],
    principal_id: str | None = None,
    since: datetime | float | None = None,
) -> Iterator[UsageEntry]:
    """Entries oldest first, optionally of one principal and from a time on (inclusive)."""
    start = _epoch(since)
    for file in ledger_files(path):
        for entry in _read_file(file):
            if principal_id is not None and entry.principal_id != principal_id:
                continue
            if start is not None and entry.time < start:
                continue
            yield entry


def _read_file(file: Path) -> Iterator[UsageEntry]:
    try:
        handle = file.open("r", encoding="utf-8")
    except FileNotFoundError:  # rotated away between listing and opening
        return
    with handle:
        for number, line in enumerate(handle, 1):
            try:
                yield UsageEntry(**json.loads(line))
            except (ValueError, TypeError):
                log.warning("%s:%d: skipping a damaged usage line", file, number)


def _epoch(since: datetime | float | None) -> float | None:
    if since is None or isinstance(since, int | float):
        return since
    if since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    return since.timestamp()


@dataclass(slots=True)
class UsageTotals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def summarize_usage(entries: Iterator[UsageEntry]) -> dict[str, UsageTotals]:
    """Totals per principal (requests without one are under "-")."""
    totals: dict[str, UsageTotals] = {}
    for entry in entries:
        t = totals.setdefault(entry.principal_id or "-", UsageTotals())
        t.requests += 1
        t.prompt_tokens += entry.prompt_tokens
        t.completion_tokens += entry.completion_tokens
    return totals


def summarize_by_model(
    entries: Iterable[UsageEntry], aliases: Mapping[str, str] | None = None
) -> dict[str, UsageTotals]:
    """Totals per model, most tokens first. A name in `aliases` (engine.aliases) counts as the
    model it stands for, as per-model limits count it (requests without one: "-")."""
    totals: dict[str, UsageTotals] = {}
    for entry in entries:
        model = entry.model or "-"
        t = totals.setdefault((aliases or {}).get(model, model), UsageTotals())
        t.requests += 1
        t.prompt_tokens += entry.prompt_tokens
        t.completion_tokens += entry.completion_tokens
    return dict(sorted(totals.items(), key=lambda item: (-item[1].total_tokens, item[0])))


def open_ledger(config: UsageConfig) -> UsageLedger | None:
    """The ledger the config asks for, or None when `usage.ledger` is null."""
    if config.ledger is None:
        return None
    return UsageLedger(
        config.ledger, int(config.max_bytes), config.backups, fsync_seconds=config.fsync_seconds
    )
