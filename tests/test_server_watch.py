"""`server.watch_config`: a running server reloads its config when the file changes, through
the same Reloader as SIGHUP; a broken or refused edit is reported once, a file replaced by
rename or through a symlink is followed, a missing file changes nothing."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmserve.server.watch import ChangeDetector, file_digest, watch_file
from tests.support.process import ServerProcess, llmserve_up
from tests.test_server_reload import base_config, config_path, limit_header, metric

LIVE, EDIT, HALF = "live", "edit", "half"


def polls(detector: ChangeDetector, digests: list[str | None], live: str = LIVE) -> list[bool]:
    return [detector.observe(digest, live) for digest in digests]


def test_an_edit_reloads_once_when_two_polls_in_a_row_read_it() -> None:
    detector = ChangeDetector(tried=LIVE)
    assert polls(detector, [LIVE, EDIT, EDIT, EDIT, EDIT]) == [False, False, True, False, False]


def test_a_file_written_in_two_steps_is_read_once_settled() -> None:
    detector = ChangeDetector(tried=LIVE)
    assert polls(detector, [HALF, EDIT, EDIT]) == [False, False, True]


def test_a_broken_edit_is_tried_once_per_edit() -> None:
    detector = ChangeDetector(tried=LIVE)
    # the reload of EDIT failed: LIVE stays live; EDIT is not tried again until it is made again
    assert polls(detector, [EDIT, EDIT, EDIT, EDIT]) == [False, True, False, False]
    assert polls(detector, [LIVE, EDIT, EDIT]) == [False, False, True]


def test_a_missing_file_changes_nothing_until_it_is_back() -> None:
    detector = ChangeDetector(tried=LIVE)
    assert polls(detector, [EDIT, None, EDIT, None, None, LIVE, LIVE]) == [False] * 7
    assert polls(detector, [EDIT, EDIT]) == [False, True]


def test_a_change_made_another_way_is_not_reloaded_again() -> None:
    detector = ChangeDetector(tried=LIVE)
    assert polls(detector, [EDIT], live=LIVE) == [False]
    assert polls(detector, [EDIT, EDIT], live=EDIT) == [False, False]  # SIGHUP applied it


class FakeReloader:
    """Reads the file as the Reloader does; `ok` lines apply, anything else is invalid."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sha256 = file_digest(path) or ""
        self.read: list[str] = []

    async def reload(self) -> object:
        text = self.path.read_text()
        self.read.append(text)
        if text.startswith("ok"):
            self.sha256 = hashlib.sha256(text.encode()).hexdigest()
        return None


class Finished(Exception):
    pass


async def watch_through(reloader: FakeReloader, steps: list[Callable[[], object]]) -> None:
    """Run the watcher for one poll per step, each step done while it sleeps."""
    actions = iter(steps)

    async def sleep(seconds: float) -> None:
        action = next(actions, None)
        if action is None:
            raise Finished
        action()

    with pytest.raises(Finished):
        await watch_file(reloader, reloader.path, sleep=sleep)


def nothing() -> None:
    pass


async def test_a_file_replaced_by_rename_or_a_symlink_swap_is_followed(tmp_path: Path) -> None:
    path = tmp_path / "llmserve.yaml"
    path.write_text("ok 1")
    reloader = FakeReloader(path)

    def rename(text: str) -> Callable[[], None]:
        def step() -> None:
            (tmp_path / "new.yaml").write_text(text)
            os.replace(tmp_path / "new.yaml", path)

        return step

    def swap_symlink(text: str) -> Callable[[], None]:  # how a ConfigMap volume updates
        def step() -> None:
            (tmp_path / "data-2").mkdir()
            (tmp_path / "data-2" / "llmserve.yaml").write_text(text)
            os.symlink(tmp_path / "data-2" / "llmserve.yaml", tmp_path / "link")
            os.replace(tmp_path / "link", path)

        return step

    await watch_through(reloader, [rename("ok 2"), nothing, swap_symlink("ok 3"), nothing])
    assert reloader.read == ["ok 2", "ok 3"]


async def test_a_vanished_file_is_watched_until_it_comes_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "llmserve.yaml"
    path.write_text("ok 1")
    reloader = FakeReloader(path)
    await watch_through(reloader, [path.unlink, nothing, nothing, lambda: path.write_text("ok 2"),
                                   nothing, nothing])  # fmt: skip
    assert reloader.read == ["ok 2"]
    missing = [r for r in caplog.records if "missing or unreadable" in r.getMessage()]
    assert len(missing) == 1  # once when it went, not once a poll


async def test_a_broken_file_is_reloaded_once_and_the_watcher_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "llmserve.yaml"
    path.write_text("ok 1")
    reloader = FakeReloader(path)
    await watch_through(reloader, [lambda: path.write_text("broken"), *[nothing] * 5,
                                   lambda: path.write_text("ok 2"), nothing])  # fmt: skip
    assert reloader.read == ["broken", "ok 2"]


# --- a real `llmserve up` on the fake engine ----------------------------------------------------


def watched_config(tmp_path: Path, rpm: int) -> dict[str, Any]:
    config = base_config(tmp_path, rpm)
    config["server"]["watch_config"] = True
    return config


def edited(server: ServerProcess, rpm: int) -> str:
    data = yaml.safe_load(config_path(server).read_text())
    data["limits"]["tiers"]["t"]["requests_per_minute"] = rpm
    return yaml.safe_dump(data)


def wait_until(check: Callable[[], bool], server: ServerProcess, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, server.log()[-3000:]
        time.sleep(0.25)


def reloads(server: ServerProcess) -> dict[str, str]:
    lines = metric(server, "llmserve_config_reloads_total{")
    return {line.split('"')[1]: line.rsplit(" ", 1)[1] for line in lines}


def test_watch_config_applies_an_edit_and_a_renamed_file_without_a_signal(tmp_path: Path) -> None:
    with llmserve_up(tmp_path, watched_config(tmp_path, rpm=1000)) as server:
        assert limit_header(server) == "1000"
        config_path(server).write_text(edited(server, 700))
        wait_until(lambda: limit_header(server) == "700", server)
        temporary = tmp_path / "next.yaml"
        temporary.write_text(edited(server, 500))
        os.replace(temporary, config_path(server))  # how editors save
        wait_until(lambda: limit_header(server) == "500", server)
        assert reloads(server) == {"applied": "2.0"}
        digest = hashlib.sha256(config_path(server).read_bytes()).hexdigest()
        assert metric(server, "llmserve_config_info") == [
            f'llmserve_config_info{{sha256="{digest}"}} 1.0'
        ]
        assert server.log().count("config reload applied: limits.tiers.t.requests_per_minute") == 2


def test_watch_config_reports_a_broken_edit_and_an_engine_change_once_each(tmp_path: Path) -> None:
    with llmserve_up(tmp_path, watched_config(tmp_path, rpm=1000)) as server:
        good = config_path(server).read_text()
        config_path(server).write_text(
            good.replace("requests_per_minute: 1000", "requests_per_minute: lots")
        )
        wait_until(lambda: "invalid" in reloads(server), server)
        data = yaml.safe_load(good)
        data["engine"]["max_model_len"] = 1024
        data["limits"]["tiers"]["t"]["requests_per_minute"] = 5
        config_path(server).write_text(yaml.safe_dump(data))
        wait_until(lambda: "refused" in reloads(server), server)
        time.sleep(3.5)  # three more polls of the same refused file
        assert reloads(server) == {"invalid": "1.0", "refused": "1.0"}
        assert limit_header(server) == "1000"  # the old settings are live
        log = server.log()
        assert log.count("config reload invalid: nothing changed") == 1
        assert "limits.tiers.t.requests_per_minute: expected a valid integer" in log
        assert log.count("config reload refused: nothing changed") == 1
        assert "engine.max_model_len" in log
        assert server.proc.poll() is None
