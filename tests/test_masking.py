"""No credential of a URL (a Redis password) is ever shown: not by `llmserve check`, not in an
error message, not in a log line."""

from __future__ import annotations

import io
import logging

import pytest
from typer.testing import CliRunner

from llmserve.cli.main import app
from llmserve.config import LoggingConfig
from llmserve.errors import ConfigError
from llmserve.limits.stores import store_from_url
from llmserve.logs import configure_logging
from llmserve.masking import mask_url_credentials

PASSWORD = "hunter2-redis-password"


def test_url_passwords_are_masked_and_the_rest_kept():
    text = f"redis://:{PASSWORD}@db:6379/0, rediss://app:{PASSWORD}@db/1, https://x.test/a@b"
    assert mask_url_credentials(text) == (
        "redis://:****@db:6379/0, rediss://app:****@db/1, https://x.test/a@b"
    )


def test_check_masks_the_password_of_the_limiter_store(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"limits: {{store: 'redis://:{PASSWORD}@127.0.0.1:6379/0'}}\n")
    result = CliRunner().invoke(app, ["check", "-c", str(config)])
    assert result.exit_code == 0, result.output
    assert PASSWORD not in result.output
    assert "redis://:****@127.0.0.1:6379/0" in result.stdout


def test_a_bad_store_url_is_an_error_without_its_password():
    with pytest.raises(ConfigError) as caught:
        store_from_url(f"mongodb://admin:{PASSWORD}@db/0")
    assert PASSWORD not in str(caught.value) and "admin:****@" in str(caught.value)


def test_log_lines_never_carry_a_url_password():
    stream = io.StringIO()
    configure_logging(LoggingConfig(), stream)
    try:
        logging.getLogger("llmserve.limits").error("redis %s unreachable", f"redis://:{PASSWORD}@h")
    finally:
        configure_logging(LoggingConfig())
    assert PASSWORD not in stream.getvalue() and "redis://:****@h" in stream.getvalue()
