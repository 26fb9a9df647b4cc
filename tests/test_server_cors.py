"""Browser access: preflights from allowed origins are answered without credentials, others are
refused, and every response to an allowed origin (errors and streams too) names it."""

from __future__ import annotations

import httpx
import pytest

from tests.support.process import llmserve_up
from tests.test_server_auth import auth_config, create_key

ALLOWED = "https://app.example.test"


@pytest.fixture
def server(tmp_path):
    config = auth_config(tmp_path)
    config["server"] = {"cors": {"allowed_origins": [ALLOWED], "max_age_seconds": 120}}
    with llmserve_up(tmp_path, config) as running:
        key = create_key(tmp_path, next(tmp_path.glob("llmserve-*.yaml")))
        yield running, key


def _preflight(base: str, origin: str) -> httpx.Response:
    return httpx.options(
        base + "/v1/chat/completions",
        headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"},
    )  # fmt: skip


def test_preflight_from_an_allowed_origin_needs_no_credentials(server):
    running, _ = server
    response = _preflight(running.base_url, ALLOWED)
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert "authorization" in response.headers["Access-Control-Allow-Headers"]
    assert response.headers["Access-Control-Max-Age"] == "120"


def test_preflight_from_another_origin_is_refused(server):
    running, _ = server
    response = _preflight(running.base_url, "https://evil.example.test")
    assert response.status_code == 403
    assert "Access-Control-Allow-Origin" not in response.headers
    assert response.json()["error"]["code"] == "origin_not_allowed"


def test_responses_to_an_allowed_origin_carry_cors_headers_errors_included(server):
    running, key = server
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    ok = httpx.post(running.base_url + "/v1/chat/completions", json=body,
                    headers={"Origin": ALLOWED, "Authorization": f"Bearer {key}"})  # fmt: skip
    assert ok.status_code == 200
    assert ok.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "x-ratelimit-remaining-requests" in ok.headers["Access-Control-Expose-Headers"]
    denied = httpx.post(running.base_url + "/v1/chat/completions", json=body,
                        headers={"Origin": ALLOWED})  # fmt: skip
    assert denied.status_code == 401
    assert denied.headers["Access-Control-Allow-Origin"] == ALLOWED  # the page can read why
    other = httpx.post(running.base_url + "/v1/chat/completions", json=body,
                       headers={"Origin": "https://evil.example.test",
                                "Authorization": f"Bearer {key}"})  # fmt: skip
    assert "Access-Control-Allow-Origin" not in other.headers


def test_a_page_may_read_every_rate_limit_header_the_server_can_send_by_default():
    from llmserve.config import CorsConfig
    from llmserve.limits.headers import rate_limit_headers
    from llmserve.limits.windows import WindowStatus

    windows = [
        WindowStatus(name, 100, 1, 99, 30.0, model)
        for model in (None, "smollm2")
        for name in ("requests_per_minute", "tokens_per_minute")
    ]  # fmt: skip
    sent = set(rate_limit_headers(windows))
    assert any("model_per_key" in name for name in sent)  # the per-model trios are there
    assert sent <= {name.lower() for name in CorsConfig().expose_headers}
