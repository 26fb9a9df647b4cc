from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest

from llmserve.config import UsageConfig
from llmserve.records import RequestRecord
from llmserve.usage import (
    UsageLedger,
    ledger_files,
    open_ledger,
    read_usage,
    summarize_usage,
)


def record(i: int, principal: str = "key_a", started_at: float = 1_700_000_000.0, **kw: object):
    base: dict[str, object] = dict(
        request_id=f"req-{i}", route="chat", started_at=started_at, principal_id=principal,
        tier="pro", model="smollm2", status=200, prompt_tokens=10, completion_tokens=5,
        finish_reason="stop", queue_wait_seconds=0.01, ttft_seconds=0.1, total_seconds=0.5,
    )  # fmt: skip
    return RequestRecord(**{**base, **kw})  # type: ignore[arg-type]


def test_append_writes_one_json_line_with_every_field(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    with UsageLedger(path, max_bytes=1 << 20, backups=2) as ledger:
        ledger.append(record(1, status=429, error_code="rate_limit_exceeded", finish_reason=None,
                             metadata={"job": "nightly-eval"}))  # fmt: skip
    (line,) = path.read_text().splitlines()
    entry = json.loads(line)
    assert entry == {
        "time": 1_700_000_000.0, "request_id": "req-1", "principal_id": "key_a", "tier": "pro",
        "model": "smollm2", "route": "chat", "status": 429, "error_code": "rate_limit_exceeded",
        "prompt_tokens": 10, "completion_tokens": 5, "finish_reason": None,
        "queue_wait_seconds": 0.01, "ttft_seconds": 0.1, "total_seconds": 0.5,
        "disconnected": False, "metadata": {"job": "nightly-eval"}, "shadow_refused": None,
    }  # fmt: skip
    assert (path.stat().st_mode & 0o777) == 0o600  # usage is private to the operator


def test_health_checks_and_scrapes_are_not_usage(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    with UsageLedger(path, max_bytes=1 << 20, backups=2) as ledger:
        ledger.append(record(1, route="health"))
        ledger.append(record(2, route="metrics"))
        ledger.append(record(3, route="completions"))
    assert [e.request_id for e in read_usage(path)] == ["req-3"]


def test_rotation_by_size_keeps_the_configured_backups_and_every_recent_record(
    tmp_path: Path,
) -> None:
    path = tmp_path / "usage.jsonl"
    with UsageLedger(path, max_bytes=1000, backups=2, fsync_seconds=0) as ledger:
        ledger.append(record(0))
        line_size = path.stat().st_size
        for i in range(1, 40):
            ledger.append(record(i))
    files = ledger_files(path)
    assert [f.name for f in files] == ["usage.jsonl.2", "usage.jsonl.1", "usage.jsonl"]
    assert all(f.stat().st_size <= 1000 for f in files)
    per_file = 1000 // line_size
    ids = [int(e.request_id.split("-")[1]) for e in read_usage(path)]
    assert ids == list(range(40 - len(ids), 40))  # oldest first, contiguous, newest kept
    assert len(ids) > 2 * per_file


def test_zero_backups_drops_the_old_file_at_rotation(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    with UsageLedger(path, max_bytes=400, backups=0) as ledger:
        for i in range(10):
            ledger.append(record(i))
    assert ledger_files(path) == [path]
    assert path.stat().st_size <= 400


def test_read_filters_by_principal_and_since(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    with UsageLedger(path, max_bytes=1 << 20, backups=1) as ledger:
        ledger.append(record(1, principal="alice", started_at=1000.0))
        ledger.append(record(2, principal="bob", started_at=2000.0))
        ledger.append(record(3, principal="alice", started_at=3000.0))
    assert [e.request_id for e in read_usage(path, principal_id="alice")] == ["req-1", "req-3"]
    assert [e.request_id for e in read_usage(path, since=2000.0)] == ["req-2", "req-3"]
    since = datetime.fromtimestamp(2500, tz=UTC)
    assert [e.request_id for e in read_usage(path, "alice", since)] == ["req-3"]


def test_summarize_totals_per_principal(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    with UsageLedger(path, max_bytes=1 << 20, backups=1) as ledger:
        for i in range(3):
            ledger.append(record(i, principal="alice", completion_tokens=7))
        ledger.append(record(9, principal="bob", prompt_tokens=1, completion_tokens=1))
    totals = summarize_usage(read_usage(path))
    assert totals["alice"].requests == 3
    assert totals["alice"].total_tokens == 3 * (10 + 7)
    assert totals["bob"].total_tokens == 2


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    with UsageLedger(path, max_bytes=1 << 20, backups=1) as ledger:
        ledger.append(record(1))
    with path.open("a") as f:
        f.write('{"time": 1700000000.0, "request_id": "re')  # a crash mid-write
    assert [e.request_id for e in read_usage(path)] == ["req-1"]


def test_reading_a_missing_ledger_yields_nothing(tmp_path: Path) -> None:
    assert list(read_usage(tmp_path / "nope.jsonl")) == []


def test_open_ledger_follows_the_config(tmp_path: Path) -> None:
    assert open_ledger(UsageConfig(ledger=None)) is None
    ledger = open_ledger(UsageConfig(ledger=tmp_path / "u.jsonl", max_bytes="1KiB", backups=3))
    assert ledger is not None
    try:
        assert (ledger.max_bytes, ledger.backups, ledger.fsync_seconds) == (1024, 3, 1.0)
    finally:
        ledger.close()


def test_background_fsync_runs_and_clears_the_dirty_flag(tmp_path: Path) -> None:
    with UsageLedger(tmp_path / "u.jsonl", max_bytes=1 << 20, backups=1, fsync_seconds=60) as led:
        led.append(record(1))
        assert led._dirty
        led.sync()  # what the thread does each period
        assert not led._dirty


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_acknowledged_records_survive_sigkill_of_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    script = textwrap.dedent(
        f"""
        import sys, time
        from llmserve.records import RequestRecord
        from llmserve.usage import UsageLedger
        ledger = UsageLedger({str(path)!r}, max_bytes=1 << 20, backups=1, fsync_seconds=3600)
        for i in range(500):
            ledger.append(RequestRecord(request_id=f"r{{i}}", route="chat", started_at=0.0))
        print("acknowledged", flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).parent.parent, start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "acknowledged"
        os.killpg(proc.pid, signal.SIGKILL)  # no close(), no fsync, no atexit
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert [e.request_id for e in read_usage(path)] == [f"r{i}" for i in range(500)]


def test_the_line_written_has_exactly_the_fields_the_reader_expects(tmp_path: Path) -> None:
    from dataclasses import fields

    from llmserve.usage import UsageEntry

    path = tmp_path / "usage.jsonl"
    with UsageLedger(path, max_bytes=1 << 20, backups=2) as ledger:
        ledger.append(record(1))
    (line,) = path.read_text().splitlines()
    assert set(json.loads(line)) == {f.name for f in fields(UsageEntry)}
    (entry,) = read_usage(path)
    assert (entry.request_id, entry.total_tokens) == ("req-1", 15)
