"""Bad input gets the right status and one OpenAI-shaped error body, and loses nothing."""

from __future__ import annotations

import pytest

from llmserve.engine.fake import FakeEngine
from tests.support.api import chat_body, make_config


def assert_error_shape(body, status_code=None):
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["code"] is None or isinstance(error["code"], str)
    return error


async def post_chat(client, body):
    resp = await client.post("/v1/chat/completions", json=body)
    return resp.status, assert_error_shape(await resp.json())


@pytest.mark.parametrize(
    ("body", "param", "code", "fragment"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model", "invalid_request",
         "Missing required parameter"),
        ({"model": "fake"}, "messages", "invalid_request", "Missing required parameter"),
        (chat_body(temperature="hot"), "temperature", "invalid_request", "Invalid type"),
        (chat_body(temperature=3), "temperature", "invalid_request", "less than or equal to 2"),
        (chat_body(max_tokens=0), "max_tokens", "invalid_request", "greater than or equal to 1"),
        (chat_body(max_tokens="5"), "max_tokens", "invalid_request", "Invalid type"),
        (chat_body(stream="yes"), "stream", "invalid_request", "Invalid type"),
        (chat_body(stop=["a", "b", "c", "d", "e"]), "stop", "invalid_request", "at most 4"),
        (chat_body(n=2), "n", "unsupported_value", "Only n=1"),
        (chat_body(tools=[{"type": "function"}]), "tools", "unsupported_parameter",
         "'tools' parameter is not supported"),
        (chat_body(logprobs=True), "logprobs", "unsupported_parameter", "not supported"),
        (chat_body(frobnicate=1), "frobnicate", "unknown_parameter",
         "Unrecognized request argument supplied: frobnicate"),
        (chat_body(stream_options={"include_usage": True}), "stream_options", "invalid_request",
         "only allowed when 'stream' is enabled"),
        ({"model": "fake", "messages": []}, "messages", "invalid_request", "at least 1"),
        ({"model": "fake", "messages": [{"role": "robot", "content": "x"}]},
         "messages[0].role", "invalid_request", "expected one of"),
        ({"model": "fake", "messages": [{"role": "user", "content": 5}]},
         "messages[0].content", "invalid_request", "string or a list of text parts"),
        ({"model": "fake", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x"}}]}]},
         "messages[0].content[0]", "invalid_request", "only text parts"),
    ],
)  # fmt: skip
async def test_invalid_requests_name_the_parameter(client, engine, body, param, code, fragment):
    status, error = await post_chat(client, body)
    assert status == 400
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["code"] == code
    assert fragment in error["message"]
    assert not engine.calls  # nothing reached the engine


async def test_neutral_values_of_unsupported_parameters_are_accepted(client):
    resp = await client.post(
        "/v1/chat/completions",
        json=chat_body(max_tokens=1, n=1, logprobs=False, tools=None, tool_choice="none"),
    )
    assert resp.status == 200


async def test_malformed_json_is_400(client):
    resp = await client.post(
        "/v1/chat/completions", data=b'{"model": "fake", "messages": [',
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    assert resp.status == 400
    error = assert_error_shape(await resp.json())
    assert error["code"] == "invalid_json"


async def test_json_that_is_not_an_object_is_400(client):
    resp = await client.post("/v1/chat/completions", json=[1, 2])
    assert resp.status == 400
    assert "JSON object" in assert_error_shape(await resp.json())["message"]


async def test_wrong_content_type_is_415(client):
    resp = await client.post("/v1/chat/completions", data="model=fake")
    assert resp.status == 415
    assert assert_error_shape(await resp.json())["code"] == "unsupported_media_type"


async def test_body_over_the_limit_is_413(app_client, tmp_path, engine):
    config = make_config(tmp_path, server={"max_body_bytes": 1000})
    client = await app_client(config, engine)
    resp = await client.post("/v1/chat/completions", json=chat_body("x" * 5000))
    assert resp.status == 413
    assert assert_error_shape(await resp.json())["code"] == "request_too_large"
    assert not engine.calls


async def test_body_over_the_limit_without_content_length_is_413(app_client, tmp_path, engine):
    config = make_config(tmp_path, server={"max_body_bytes": 1000})
    client = await app_client(config, engine)

    async def chunks():
        for _ in range(10):
            yield b"x" * 500

    resp = await client.post("/v1/chat/completions", data=chunks(),
                             headers={"Content-Type": "application/json"})  # fmt: skip
    assert resp.status == 413


async def test_wrong_method_is_405_with_allow(client):
    resp = await client.get("/v1/chat/completions")
    assert resp.status == 405
    assert resp.headers["Allow"] == "POST"
    assert assert_error_shape(await resp.json())["code"] == "method_not_allowed"


async def test_unknown_path_is_404(client):
    resp = await client.get("/v2/nothing")
    assert resp.status == 404
    assert assert_error_shape(await resp.json())["code"] == "not_found"


async def test_unknown_model_is_404(client, engine):
    status, error = await post_chat(client, chat_body(model="gpt-9"))
    assert status == 404
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"


async def test_context_length_exceeded_gives_the_numbers(client, engine):
    status, error = await post_chat(client, chat_body("word " * 200, max_tokens=100))
    assert status == 400
    assert error["code"] == "context_length_exceeded"
    assert "maximum context length is 256 tokens" in error["message"]
    assert "302 tokens (202 in the prompt, 100 in the completion)" in error["message"]
    assert not engine.calls


async def test_too_long_completion_prompt_names_the_prompt(client):
    resp = await client.post("/v1/completions", json={"model": "fake", "prompt": "w " * 300})
    assert resp.status == 400
    error = assert_error_shape(await resp.json())
    assert (error["code"], error["param"]) == ("context_length_exceeded", "prompt")


async def test_prompt_filling_the_context_without_max_tokens_is_rejected(client):
    status, error = await post_chat(client, chat_body("word " * 260))
    assert status == 400
    assert error["code"] == "context_length_exceeded"


async def test_internal_error_is_generic_and_logged(app_client, config, caplog):
    class Broken(FakeEngine):
        async def render_chat(self, messages):
            raise RuntimeError("secret internal detail /etc/passwd")

    client = await app_client(config, Broken("fake", 256))
    resp = await client.post("/v1/chat/completions", json=chat_body())
    assert resp.status == 500
    text = await resp.text()
    assert "secret internal detail" not in text and "passwd" not in text
    error = assert_error_shape(await resp.json())
    assert error["code"] == "internal_error"
    assert "X-Request-Id" in error["message"]
    assert "secret internal detail" in caplog.text  # the full error reaches the log


async def test_engine_failure_before_first_token_is_500_json(app_client, config):
    client = await app_client(config, FakeEngine("fake", 256, fail_before_first_token=True))
    for stream in (False, True):
        resp = await client.post("/v1/chat/completions", json=chat_body(stream=stream))
        assert resp.status == 500
        assert assert_error_shape(await resp.json())["code"] == "engine_error"


async def test_dead_engine_is_503_with_retry_after(app_client, config):
    engine = FakeEngine("fake", 256)
    client = await app_client(config, engine)
    engine.kill()
    resp = await client.post("/v1/chat/completions", json=chat_body())
    assert resp.status == 503
    assert int(resp.headers["Retry-After"]) >= 1
    assert assert_error_shape(await resp.json())["code"] == "engine_unavailable"
    ready = await client.get("/ready")
    assert ready.status == 503


async def test_invalid_requests_count_against_requests_per_minute(app_client, tmp_path):
    from llmserve.limits.limiter import Limiter
    from llmserve.limits.stores import store_from_url
    from tests.support.api import make_config

    config = make_config(tmp_path, limits={"default_tier": "t",
                                           "tiers": {"t": {"requests_per_minute": 3}}})  # fmt: skip
    limiter = Limiter(config.limits, store_from_url(config.limits.store, config.limits.state_dir))
    client = await app_client(config, FakeEngine("fake", 256), limiter=limiter)
    bad = [{"model": "fake"}, chat_body(temperature="hot"), {"model": "nope", "messages": []}]
    statuses = [(await client.post("/v1/chat/completions", json=body)).status for body in bad]
    assert statuses == [400, 400, 400]
    refused = await client.post("/v1/chat/completions", json=chat_body(max_tokens=1))
    assert refused.status == 429  # the three invalid ones used the minute's requests
    assert (await refused.json())["error"]["code"] == "rate_limit_exceeded"
