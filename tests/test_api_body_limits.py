"""A request body is parsed once, off the event loop when it is large, and its shape is bounded
before anything validates it: each count (`server.max_messages`, `max_prompts`,
`max_json_values`, `max_json_depth`) is a 400 that names its setting."""

from __future__ import annotations

import gc
import json
import random
import threading
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError
from pydantic_core import from_json

from llmserve.api import body as body_module
from llmserve.api.body import JSONLimits, parse_json_object, values_at_least
from llmserve.engine.vllm_frontend import first_error
from llmserve.errors import InvalidRequest
from tests.support.api import chat_body, make_config
from tests.support.flood import invalid_body
from tests.test_api_delegated import EngineWithFrontend, ScriptedFrontend


def count_values(value: Any) -> int:
    """Array items and object members at every level (what server.max_json_values counts)."""
    if isinstance(value, dict):
        return len(value) + sum(count_values(v) for v in value.values())
    if isinstance(value, list):
        return len(value) + sum(count_values(v) for v in value)
    return 0


async def post(client, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    resp = await client.post(path, json=body)
    return resp.status, (await resp.json())["error"]


async def test_too_many_messages_is_a_400_naming_the_limit(app_client, tmp_path, engine):
    client = await app_client(make_config(tmp_path, server={"max_messages": 3}), engine)
    messages = [{"role": "user", "content": "x"}] * 4
    status, error = await post(client, "/v1/chat/completions", chat_body(messages=messages))
    assert status == 400
    assert error["code"] == "array_above_max_length"
    assert error["param"] == "messages"
    assert "maximum length 3 (server.max_messages)" in error["message"]
    assert "length 4" in error["message"]
    assert not engine.calls
    ok = await client.post("/v1/chat/completions", json=chat_body(messages=messages[:3]))
    assert ok.status == 200


async def test_a_prompt_batch_over_the_limit_is_a_400_but_token_ids_are_one_prompt(
    app_client, tmp_path, engine
):
    client = await app_client(make_config(tmp_path, server={"max_prompts": 2}), engine)
    batch = {"model": "fake", "prompt": ["a", "b", "c"]}
    status, error = await post(client, "/v1/completions", batch)
    assert (status, error["code"], error["param"]) == (400, "array_above_max_length", "prompt")
    assert "server.max_prompts" in error["message"]
    # token ids: one prompt, not three (the fake engine has no frontend for them: its own 400)
    status, error = await post(client, "/v1/completions", {"model": "fake", "prompt": [1, 2, 3]})
    assert status == 400
    assert error["code"] != "array_above_max_length"


@pytest.mark.parametrize("json_thread_bytes", [0, 1 << 20])  # parsed on the thread, or not
async def test_too_many_values_and_too_deep_are_400s_naming_the_limit(
    app_client, tmp_path, engine, json_thread_bytes
):
    server = {"max_json_values": 100, "max_json_depth": 8, "json_thread_bytes": json_thread_bytes}
    client = await app_client(make_config(tmp_path, server=server), engine)
    status, error = await post(client, "/v1/chat/completions", chat_body(stop=[0] * 200))
    assert (status, error["code"]) == (400, "request_too_complex")
    assert "more than 100 JSON values (" in error["message"]
    assert "server.max_json_values" in error["message"]
    deep: Any = "x"
    for _ in range(8):
        deep = [deep]
    status, error = await post(client, "/v1/chat/completions", chat_body(metadata=deep))
    assert (status, error["code"]) == (400, "request_too_complex")
    assert "more than 8 levels deep (server.max_json_depth)" in error["message"]
    assert not engine.calls
    # within every limit: the usual answers
    assert (await client.post("/v1/chat/completions", json=chat_body(max_tokens=2))).status == 200


def test_the_limits_are_inclusive():
    size = 1000
    limits = JSONLimits(max_values=size, max_depth=5, max_messages=3, max_prompts=2)
    # {"a": [0, ..., 0]}: size values in all (the list's items and "a" itself)
    parse_json_object(json.dumps({"a": [0] * (size - 1)}).encode(), limits)
    with pytest.raises(InvalidRequest, match=r"server\.max_json_values"):
        parse_json_object(json.dumps({"a": [0] * size}).encode(), limits)
    parse_json_object(b'{"a": [[[[1]]]]}', limits)  # the body and four lists: 5 levels
    with pytest.raises(InvalidRequest, match=r"server\.max_json_depth"):
        parse_json_object(b'{"a": [[[[[1]]]]]}', limits)
    parse_json_object(json.dumps({"messages": [1] * 3, "prompt": ["a"] * 2}).encode(), limits)
    with pytest.raises(InvalidRequest, match=r"server\.max_messages"):
        parse_json_object(json.dumps({"input": [1] * 4}).encode(), limits)
    with pytest.raises(InvalidRequest, match=r"server\.max_prompts"):
        parse_json_object(json.dumps({"prompt": [[1]] * 3}).encode(), limits)
    parse_json_object(json.dumps({"prompt": [1] * 3}).encode(), limits)  # token ids: one


def test_a_body_nested_beyond_the_parsers_own_cap_is_refused_as_too_deep():
    deep = b'{"a": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    with pytest.raises(InvalidRequest) as refused:
        parse_json_object(deep, JSONLimits(max_values=1 << 20))
    assert refused.value.code == "request_too_complex"
    assert "server.max_json_depth" in refused.value.message


def test_the_value_count_before_parsing_never_exceeds_the_real_count():
    rng = random.Random(7)
    # strings full of the characters it counts, escapes and all
    alphabet = ["a", ",", "[", "{", '"', "\\", '\\"', '""', "]", "}", ":", "\n", "é", "\\\\"]

    def text() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))

    def value(depth: int) -> Any:
        roll = rng.random()
        if depth > 5 or roll < 0.3:
            return rng.choice([1, 2.5, None, True, text()])
        if roll < 0.65:
            return [value(depth + 1) for _ in range(rng.randint(0, 4))]
        return {text(): value(depth + 1) for _ in range(rng.randint(0, 4))}

    exact = 0
    for _ in range(3000):
        document = {text(): value(1) for _ in range(rng.randint(0, 4))}
        raw = json.dumps(document, ensure_ascii=rng.random() < 0.5).encode()
        real = count_values(from_json(raw))
        counted = values_at_least(raw, 1 << 30)
        assert counted <= real, raw
        exact += counted >= real // 2
    assert exact > 1000  # and it is not a bound that says nothing


@pytest.mark.parametrize("kind", ["ints", "roles", "stop", "lists", "deep"])
def test_the_largest_bodies_are_refused_before_they_are_parsed(monkeypatch, kind):
    raw = invalid_body(kind)
    parsed = []
    monkeypatch.setattr(body_module, "from_json", lambda data: parsed.append(data))
    with pytest.raises(InvalidRequest) as refused:
        parse_json_object(raw, JSONLimits())
    assert refused.value.code == "request_too_complex"
    assert parsed == []


async def test_a_body_is_parsed_once_and_a_large_one_off_the_event_loop(
    app_client, tmp_path, monkeypatch
):
    frontend = ScriptedFrontend()
    config = make_config(tmp_path, server={"json_thread_bytes": 1000})
    client = await app_client(config, EngineWithFrontend(frontend))
    parses: list[str] = []

    def counting(data: bytes) -> Any:
        parses.append(threading.current_thread().name)
        return from_json(data)

    monkeypatch.setattr(body_module, "from_json", counting)
    # tools: not the fast path's, so the frontend answers it, with the body parsed once
    small = chat_body(max_tokens=2, tools=[{"type": "function"}])
    assert (await client.post("/v1/chat/completions", json=small)).status == 200
    large = chat_body("x" * 2000, max_tokens=2, tools=[{"type": "function"}])
    assert (await client.post("/v1/chat/completions", json=large)).status == 200
    assert parses == [threading.current_thread().name, "llmserve-json_0"]
    assert [body["messages"][0]["content"] for body in frontend.bodies] == [
        "hello there",
        "x" * 2000,
    ]


async def test_a_refused_body_is_freed_at_once_not_left_to_the_garbage_collector(client):
    body = chat_body(messages=[{"role": "user", "content": "x"}, {"role": "tool"}])
    gc.collect()
    gc.disable()
    try:
        resp = await client.post("/v1/chat/completions", json=body)
        assert resp.status == 400  # a tool message: vLLM's to answer, and no vLLM here
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        leaked = [type(o).__name__ for o in gc.garbage if isinstance(o, InvalidRequest)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert leaked == []  # no cycle holds the refusal (and through it, the body)


def test_the_first_validation_error_is_found_without_building_them_all():
    class Model(BaseModel):
        ids: list[int]

    firsts, expected = [], []
    for count in (3, 100_000):  # few errors: errors() itself; many: their JSON text
        with pytest.raises(ValidationError) as failed:
            Model.model_validate({"ids": ["x"] * count})
        assert failed.value.error_count() == count
        first = first_error(failed.value)
        firsts.append((first["type"], list(first["loc"]), first["msg"]))
        if count == 3:
            error = failed.value.errors(include_url=False)[0]
            expected = [(error["type"], ["ids", 0], error["msg"])] * 2
    assert firsts == expected
