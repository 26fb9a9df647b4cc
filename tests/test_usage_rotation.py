"""Ledger rotation failures: no foreign descriptor closed, and the ledger recovers."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from llmserve.records import RequestRecord
from llmserve.usage import UsageLedger


def record(i: int) -> RequestRecord:
    return RequestRecord(request_id=f"req-{i}", route="chat", started_at=0.0, principal_id="k")


def test_a_failed_rotation_never_closes_a_descriptor_the_ledger_does_not_own(
    tmp_path: Path,
) -> None:
    """The ledger file is moved away (an operator, logrotate). At the next rotation `_rotate`
    closes its descriptor, then `path.replace` raises FileNotFoundError before reopening, so
    `self._fd` keeps a closed descriptor's number and `_size` stays over max_bytes. The next
    descriptor the process opens (in a server: a client socket, a SQLite file) gets that
    number, and the next append's rotation fsyncs and closes it."""
    path = tmp_path / "usage.jsonl"
    ledger = UsageLedger(path, max_bytes=200, backups=2, fsync_seconds=0)
    ledger.append(record(1))  # 270 bytes: the next append rotates
    path.unlink()
    with contextlib.suppress(OSError):  # losing this one record is tolerable
        ledger.append(record(2))
    fd = os.open(tmp_path / "unrelated.bin", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            ledger.append(record(3))
        os.fstat(fd)  # OSError EBADF: the ledger closed a descriptor it does not own
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def test_the_ledger_recovers_after_a_failed_rotation(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    ledger = UsageLedger(path, max_bytes=200, backups=2, fsync_seconds=0)
    ledger.append(record(1))
    path.unlink()
    with contextlib.suppress(OSError):
        ledger.append(record(2))
    ledger.append(record(3))  # OSError EBADF on every append from now on
    assert b"req-3" in path.read_bytes()


def test_a_torn_last_line_does_not_swallow_the_next_record(tmp_path: Path) -> None:
    from llmserve.records import RequestRecord
    from llmserve.usage import UsageLedger, read_usage

    path = tmp_path / "usage.jsonl"
    path.write_text('{"time": 1, "request_id": "torn", "princ')  # a crash mid-write
    with UsageLedger(path, max_bytes=1 << 20, backups=1, fsync_seconds=0) as ledger:
        ledger.append(RequestRecord(request_id="next", route="chat", started_at=2.0, status=200))
    assert [entry.request_id for entry in read_usage(path)] == ["next"]
