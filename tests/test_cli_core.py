"""`llmserve --version`, `llmserve check` and JSON logs, via typer's runner and a subprocess."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

from typer.testing import CliRunner

from llmserve import __version__
from llmserve.cli.main import app
from llmserve.config import LoggingConfig
from llmserve.logs import configure_logging, request_id_var

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"llmserve {__version__}"


def test_check_prints_the_effective_config_with_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    secret = "s3cr3t-value-long-enough-for-hs256-0123"
    path.write_text(f"server: {{port: 9123}}\nauth: {{jwt: {{secret: {secret}}}}}\n")
    result = runner.invoke(app, ["check", "-c", str(path)])
    assert result.exit_code == 0, result.output
    assert "port: 9123" in result.stdout
    assert "heartbeat_seconds: 10.0" in result.stdout  # a default, filled in
    assert "s3cr3t-value" not in result.stdout
    assert "'**********'" in result.stdout


def test_check_fails_with_the_message_and_exit_2(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("queue: {max_depth: -1}\n")
    result = runner.invoke(app, ["check", "-c", str(path)])
    assert result.exit_code == 2
    assert f"{path}: queue.max_depth: expected greater than or equal to 0 (got -1)" in result.stderr


def test_check_reads_llmserve_config_env_in_a_real_process(tmp_path):
    path = tmp_path / "env.yaml"
    path.write_text("server: {port: 7001}\n")
    done = subprocess.run(
        [sys.executable, "-m", "llmserve", "check"], capture_output=True, text=True,
        env={"LLMSERVE_CONFIG": str(path), "PATH": "/usr/bin:/bin"}, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "port: 7001" in done.stdout


def test_up_with_a_broken_config_exits_2(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("engine: {kind: magic}\n")
    result = runner.invoke(app, ["up", "-c", str(path)])
    assert result.exit_code == 2
    assert "engine.kind" in result.stderr


def test_help_texts_exist():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("up", "check"):
        assert command in result.stdout


def test_json_logs_carry_the_request_id():
    stream = io.StringIO()
    configure_logging(LoggingConfig(format="json", level="info"), stream=stream)
    try:
        token = request_id_var.set("req_abc")
        logging.getLogger("llmserve.test").info("hello %s", "world", extra={"tokens": 5})
        request_id_var.reset(token)
    finally:
        logging.getLogger().handlers.clear()
    entry = json.loads(stream.getvalue().strip())
    assert entry["message"] == "hello world"
    assert entry["request_id"] == "req_abc"
    assert entry["tokens"] == 5
    assert entry["level"] == "info"
