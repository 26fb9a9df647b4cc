"""No caller can write a line of its own into a log: every untrusted value is escaped, in the
text format as in JSON lines."""

from __future__ import annotations

import io
import json
import logging

import httpx

from llmserve.config import LoggingConfig
from llmserve.logs import configure_logging, escape_control
from tests.support.process import llmserve_up
from tests.test_server_auth import auth_config


def test_control_characters_become_visible_escapes():
    assert escape_control("a\nb\r\tc\x1b[31m\x85\u2028") == "a\\nb\\r\\tc\\x1b[31m\\x85\\u2028"
    assert escape_control("plain text: ok") == "plain text: ok"


def test_a_logged_value_cannot_add_a_line_in_either_format():
    forged = "/v1/x\n2026-01-01 00:00:00 INFO    llmserve.access [req_1] GET / 200"
    for fmt in ("text", "json"):
        stream = io.StringIO()
        configure_logging(LoggingConfig(format=fmt), stream)
        try:
            logging.getLogger("llmserve.access").info("GET %s 404 principal=%s", forged, "a\rb")
        finally:
            configure_logging(LoggingConfig())
        lines = stream.getvalue().splitlines()
        assert len(lines) == 1, lines
        if fmt == "json":
            assert forged in json.loads(lines[0])["message"]  # escaped by JSON, kept whole


def test_a_newline_in_a_url_stays_inside_its_access_log_line(tmp_path):
    with llmserve_up(tmp_path, auth_config(tmp_path)) as server:
        response = httpx.get(server.base_url + "/v1/x%0a2026-01-01 INFO llmserve.access forged")
        assert response.status_code in (401, 404)
        server.terminate()
        log = server.log()
    assert not [line for line in log.splitlines() if line.startswith("2026-01-01 INFO")]
    assert "\\n2026-01-01 INFO llmserve.access forged" in log
