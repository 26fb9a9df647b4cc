"""Everything `vllm serve` answers, answered by llmserve on the real engine (SmolLM2 on CPU):
tools, structured outputs, logprobs, n, echo, the Responses API, /tokenize, with the official
`openai` SDK, LangChain, instructor and openai-agents, through auth, limits and the ledger."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import jsonschema
import pytest
from openai import AsyncOpenAI, BadRequestError, OpenAI, RateLimitError
from pydantic import BaseModel, Field

from tests.engine.conftest import SMOLLM2_DIR
from tests.support.process import llmserve_up

pytestmark = [
    pytest.mark.engine,
    pytest.mark.smollm2,
    pytest.mark.skipif(
        not (SMOLLM2_DIR / "config.json").is_file(),
        reason=f"{SMOLLM2_DIR} is missing: run `llmserve models prepare`",
    ),
]

MODEL = "smollm2"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


class Person(BaseModel):
    name: str = Field(max_length=16)
    age: int = Field(ge=0, le=99)


def _config(tmp: Path) -> dict:
    return {
        "engine": {
            "model": str(SMOLLM2_DIR), "served_model_name": MODEL, "dtype": "float32",
            "max_model_len": 2048, "max_num_seqs": 16, "cpu_kv_cache_bytes": "512MiB",
            "tool_call_parser": "hermes", "enable_auto_tool_choice": True,
        },
        "auth": {"keys": str(tmp / "keys")},
        "server": {"public_ready": True},
        "limits": {"state_dir": str(tmp / "limits"), "default_tier": "pro", "tiers": {
            "pro": {"requests_per_minute": 10000, "tokens_per_minute": 10_000_000},
            "tiny": {"requests_per_minute": 10000, "tokens_per_minute": 300},
        }},
        "usage": {"ledger": str(tmp / "usage.jsonl")},
        # these tests check answers, not latency: a burst of 20 structured outputs, slow on a
        # CPU, must wait its turn rather than be refused by the time-to-first-token objective
        "queue": {"ttft_slo_seconds": None},
    }  # fmt: skip


def _create_key(config_path: Path, tier: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "llmserve", "keys", "create", "--name", tier, "--tier", tier,
         "--json", "-c", str(config_path)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(done.stdout)["key"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    import yaml

    tmp = tmp_path_factory.mktemp("features")
    config = _config(tmp)
    config_path = tmp / "keys.yaml"
    config_path.write_text(yaml.safe_dump(config))
    keys = {tier: _create_key(config_path, tier) for tier in ("pro", "tiny")}
    with llmserve_up(tmp, config, ready_path="/ready", timeout=300) as proc:
        base = proc.base_url
        yield SimpleNamespace(
            base=base, keys=keys, ledger=tmp / "usage.jsonl", proc=proc,
            client=OpenAI(base_url=base + "/v1", api_key=keys["pro"], max_retries=0),
        )  # fmt: skip


def _ledger(server: SimpleNamespace) -> dict[str, dict]:
    lines = server.ledger.read_text().splitlines() if server.ledger.exists() else []
    return {entry["request_id"]: entry for entry in map(json.loads, lines)}


def _arguments(call) -> dict:
    return json.loads(call.function.arguments)


# -- tools -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_forced_tool_calls_have_arguments_valid_against_the_tool_schema(server, tool_choice):
    response = server.client.chat.completions.create(
        model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], tool_choice=tool_choice,
        max_tokens=80, temperature=0,
    )  # fmt: skip
    message = response.choices[0].message
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.function.name == "get_weather"
        jsonschema.validate(_arguments(call), WEATHER["function"]["parameters"])
    if tool_choice == "required":
        assert response.choices[0].finish_reason == "tool_calls"


def test_streamed_tool_call_deltas_reassemble_into_the_non_streaming_calls(server):
    kwargs = dict(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required",
                  max_tokens=80, temperature=0)  # fmt: skip
    whole = server.client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in server.client.chat.completions.create(**kwargs, stream=True):
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls"
    assert [c["name"] for c in calls.values()] == [c.function.name for c in whole]
    assert [json.loads(c["arguments"]) for c in calls.values()] == [_arguments(c) for c in whole]


def test_tool_history_and_tool_choice_none_are_answered_in_text(server):
    history = [
        *ASK_WEATHER,
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
    ]  # fmt: skip
    response = server.client.chat.completions.create(
        model=MODEL, messages=history, tools=[WEATHER], tool_choice="none", max_tokens=30,
        temperature=0,
    )  # fmt: skip
    choice = response.choices[0]
    assert not choice.message.tool_calls
    assert choice.message.content
    assert response.usage.prompt_tokens > 40  # the tool call and its result were rendered


# -- structured outputs ------------------------------------------------------------------------

# Every value is bounded (lengths, ranges, item counts): a greedy 135M model asked for an
# unbounded integer writes digits until max_tokens.
_NAME = {"type": "string", "maxLength": 16}
_SMALL = {"type": "integer", "minimum": 0, "maximum": 99}
SCHEMAS = [
    {"type": "object", "properties": {"name": _NAME, "age": _SMALL}, "required": ["name", "age"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
     "required": ["color"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": _NAME,
     "minItems": 1, "maxItems": 3}}, "required": ["tags"]},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}},
     "required": ["n"]},
    {"type": "object", "properties": {"x": _SMALL, "y": _SMALL}, "required": ["x", "y"]},
    {"type": "object", "properties": {"city": _NAME, "country": _NAME},
     "required": ["city", "country"]},
    {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "score": _SMALL},
     "required": ["answer", "score"]},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
     "lat": _SMALL, "lon": _SMALL}, "required": ["lat", "lon"]}}, "required": ["point"]},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
     "type": "object", "properties": {"id": _SMALL}, "required": ["id"]}}},
     "required": ["items"]},
    {"type": "object", "properties": {"title": _NAME, "year": {"type": "integer",
     "minimum": 1900, "maximum": 2100}}, "required": ["title", "year"]},
    {"type": "object", "properties": {"word": {"type": "string", "pattern": "^[a-z]{2,8}$"}},
     "required": ["word"]},
    {"type": "object", "properties": {"a": _SMALL, "b": _SMALL, "sum": _SMALL},
     "required": ["a", "b", "sum"]},
    {"type": "object", "properties": {"status": {"const": "done"}}, "required": ["status"]},
    {"type": "object", "properties": {"maybe": {"type": ["string", "null"], "maxLength": 10}},
     "required": ["maybe"]},
    {"type": "object", "properties": {"grid": {"type": "array", "maxItems": 2, "items": {
     "type": "array", "maxItems": 2, "items": _SMALL}}}, "required": ["grid"]},
    {"type": "object", "properties": {"email": {"type": "string",
     "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}}, "required": ["email"]},
    {"type": "object", "properties": {"language": {"enum": ["python", "rust", "go"]},
     "stars": {"type": "integer", "minimum": 0, "maximum": 5}},
     "required": ["language", "stars"]},
    {"type": "object", "properties": {"first": _NAME, "last": _NAME, "adult": {"type": "boolean"}},
     "required": ["first", "last", "adult"]},
    {"type": "object", "properties": {"days": {"type": "array", "minItems": 2, "maxItems": 2,
     "items": {"enum": ["mon", "tue", "wed"]}}}, "required": ["days"]},
]  # fmt: skip


async def test_json_schema_responses_validate_against_twenty_schemas(server):
    client = AsyncOpenAI(base_url=server.base + "/v1", api_key=server.keys["pro"], max_retries=0)

    async def ask(index: int, schema: dict) -> tuple[dict, str, str]:
        response = await client.chat.completions.create(
            model=MODEL, max_tokens=200, temperature=0,
            messages=[{"role": "user", "content": "Answer in JSON."}],
            response_format={"type": "json_schema",
                             "json_schema": {"name": f"s{index}", "schema": schema}},
        )  # fmt: skip
        choice = response.choices[0]
        return schema, choice.message.content or "", choice.finish_reason

    results = await asyncio.gather(*(ask(i, s) for i, s in enumerate(SCHEMAS)))
    assert len(results) == 20
    for schema, content, finish in results:
        assert finish == "stop", (schema, content)
        jsonschema.validate(json.loads(content), schema)


def test_json_object_and_text_response_formats(server):
    as_json = server.client.chat.completions.create(
        model=MODEL, max_tokens=200, temperature=0, response_format={"type": "json_object"},
        extra_body={"repetition_penalty": 1.3},  # a greedy 135M model otherwise loops in lists
        messages=[{"role": "user", "content": "What is the capital of France? "
                                              "Answer in JSON with one key: answer."}],
    )  # fmt: skip
    assert as_json.choices[0].finish_reason == "stop", as_json.choices[0].message.content
    assert isinstance(json.loads(as_json.choices[0].message.content), dict)
    as_text = server.client.chat.completions.create(
        model=MODEL, max_tokens=10, temperature=0, response_format={"type": "text"},
        messages=[{"role": "user", "content": "Say hello"}],
    )  # fmt: skip
    assert as_text.choices[0].message.content


def test_vllm_structured_outputs_extra_constrains_choice_and_regex(server):
    choice = server.client.chat.completions.create(
        model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "Pick one"}],
        extra_body={"structured_outputs": {"choice": ["alpha", "beta"]}},
    )  # fmt: skip
    assert choice.choices[0].message.content in ("alpha", "beta")
    regex = server.client.completions.create(
        model=MODEL, prompt="Code: ", max_tokens=10,
        extra_body={"structured_outputs": {"regex": "[0-9]{3}-[A-Z]{2}"}},
    )  # fmt: skip
    import re

    assert re.fullmatch("[0-9]{3}-[A-Z]{2}", regex.choices[0].text)


def test_a_schema_the_backend_cannot_compile_is_a_400_that_says_why(server):
    with pytest.raises(BadRequestError) as caught:
        server.client.chat.completions.create(
            model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "x"}],
            extra_body={"structured_outputs": {"regex": "(unclosed"}},
        )  # fmt: skip
    error = caught.value.body
    assert error["type"] == "invalid_request_error"
    assert "parenthesis is not closed" in error["message"]
    streamed = httpx.post(
        server.base + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {server.keys['pro']}"},
        json={"model": MODEL, "stream": True, "max_tokens": 10, "messages": ASK_WEATHER,
              "structured_outputs": {"regex": "(unclosed"}},
    )  # fmt: skip
    assert streamed.status_code == 400  # an error before the first event is a real status
    assert "parenthesis" in streamed.json()["error"]["message"]
    entry = _ledger(server)[caught.value.response.headers["x-request-id"]]
    assert entry["prompt_tokens"] == 0  # refused by the engine before it ran: free


# -- sampling fields ---------------------------------------------------------------------------


def test_n_choices_are_all_counted_in_usage_and_the_ledger(server):
    response = server.client.chat.completions.create(
        model=MODEL, n=3, max_tokens=8, logprobs=True, top_logprobs=2,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )  # fmt: skip
    assert [c.index for c in response.choices] == [0, 1, 2]
    tokens = [len(c.logprobs.content) for c in response.choices]
    assert response.usage.completion_tokens == sum(tokens)
    for choice in response.choices:
        for item in choice.logprobs.content:
            assert math.isfinite(item.logprob) and item.logprob <= 0
            assert len(item.top_logprobs) == 2
    entry = _ledger(server)[response._request_id]  # type: ignore[attr-defined]
    assert entry["completion_tokens"] == response.usage.completion_tokens
    assert entry["prompt_tokens"] == response.usage.prompt_tokens


def test_n_reserves_n_times_max_tokens(server):
    tiny = OpenAI(base_url=server.base + "/v1", api_key=server.keys["tiny"], max_retries=0)
    ask = [{"role": "user", "content": "Hi"}]
    tiny.chat.completions.create(model=MODEL, messages=ask, max_tokens=100, n=1)
    with pytest.raises(RateLimitError):  # 3 x 100 + the prompt cannot fit a 300-token minute
        tiny.chat.completions.create(model=MODEL, messages=ask, max_tokens=100, n=3)


def test_completions_echo_and_logprobs(server):
    response = server.client.completions.create(
        model=MODEL, prompt="Once upon a time", echo=True, logprobs=2, max_tokens=4
    )
    choice = response.choices[0]
    assert choice.text.startswith("Once upon a time")
    assert all(len(top) <= 3 for top in choice.logprobs.top_logprobs if top)


def test_vllm_sampling_extras_are_accepted(server):
    response = server.client.chat.completions.create(
        model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "Count: 1, 2,"}],
        extra_body={"min_p": 0.1, "stop_token_ids": [2], "skip_special_tokens": True,
                    "include_stop_str_in_output": False, "priority": 5, "min_tokens": 2,
                    "chat_template_kwargs": {"add_generation_prompt": True}},
        metadata={"job": "eval"}, store=False,
    )  # fmt: skip
    assert response.usage.completion_tokens >= 2
    assert _ledger(server)[response._request_id]["metadata"] == {"job": "eval"}  # type: ignore[attr-defined]


def test_deliberately_refused_fields_say_why(server):
    with pytest.raises(BadRequestError) as caught:
        server.client.chat.completions.create(
            model=MODEL, max_tokens=4, messages=ASK_WEATHER, extra_body={"use_beam_search": True}
        )
    assert caught.value.body["param"] == "use_beam_search"
    assert "rate limiter" in caught.value.body["message"]


# -- tokenize, responses -----------------------------------------------------------------------


def test_tokenize_agrees_with_the_prompt_tokens_of_a_chat_request(server):
    headers = {"Authorization": f"Bearer {server.keys['pro']}"}
    messages = [{"role": "user", "content": "Tell me about the Eiffel tower."}]
    counted = httpx.post(server.base + "/tokenize", headers=headers,
                         json={"model": MODEL, "messages": messages}).json()  # fmt: skip
    response = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert counted["count"] == response.usage.prompt_tokens
    text = httpx.post(server.base + "/detokenize", headers=headers,
                      json={"model": MODEL, "tokens": counted["tokens"]}).json()  # fmt: skip
    assert "Eiffel tower" in text["prompt"]
    assert httpx.post(server.base + "/tokenize", json={"prompt": "x"}).status_code == 401


def test_responses_api_text_stream_and_function_tools(server):
    response = server.client.responses.create(
        model=MODEL, input="Say hello", max_output_tokens=16, store=False
    )
    assert response.output_text and response.usage.output_tokens <= 16
    kinds = [event.type for event in server.client.responses.create(
        model=MODEL, input="Say hello", max_output_tokens=8, stream=True)]  # fmt: skip
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds
    parameters = WEATHER["function"]["parameters"]
    tool = {"type": "function", "name": "get_weather", "parameters": parameters}
    called = server.client.responses.create(
        model=MODEL, input="Weather in Paris?", tools=[tool], tool_choice="required",
        max_output_tokens=80, temperature=0,
    )  # fmt: skip
    calls = [item for item in called.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather"
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["function"]["parameters"])


def test_responses_without_a_store_refuse_previous_response_id(server):
    with pytest.raises(BadRequestError) as caught:
        server.client.responses.create(
            model=MODEL, input="again", previous_response_id="resp_123", max_output_tokens=4
        )
    assert caught.value.body["param"] == "previous_response_id"
    assert "stores none" in caught.value.body["message"]


# -- real clients ------------------------------------------------------------------------------


def test_langchain_tools_structured_output_and_streaming(server):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """Get the weather of a city."""
        return "sunny"

    llm = ChatOpenAI(model=MODEL, base_url=server.base + "/v1", api_key=server.keys["pro"],
                     temperature=0, max_tokens=120, max_retries=0)  # fmt: skip
    bound = llm.bind_tools([get_weather], tool_choice="any")
    calls = bound.invoke("What is the weather in Paris?").tool_calls
    assert calls and calls[0]["name"] == "get_weather" and isinstance(calls[0]["args"]["city"], str)
    streamed = None
    for chunk in bound.stream("What is the weather in Paris?"):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed is not None and streamed.tool_calls[0]["name"] == "get_weather"
    for method in ("json_schema", "function_calling"):
        person = llm.with_structured_output(Person, method=method).invoke("Make up a person.")
        assert isinstance(person, Person)
    raw = llm.with_structured_output(Person, method="json_mode", include_raw=True).invoke(
        "Make up a person. Answer in JSON with a name and an age."
    )
    assert isinstance(json.loads(raw["raw"].content), dict)  # a JSON object, as json_mode asks


def test_instructor_tools_and_json_schema_modes(server):
    import instructor

    for mode in (instructor.Mode.TOOLS, instructor.Mode.JSON_SCHEMA):
        client = instructor.from_openai(
            OpenAI(base_url=server.base + "/v1", api_key=server.keys["pro"]), mode=mode
        )
        person = client.chat.completions.create(
            model=MODEL, response_model=Person, max_tokens=300, temperature=0, max_retries=0,
            messages=[{"role": "user", "content": "Make up a person."}],
        )  # fmt: skip
        assert isinstance(person, Person), mode


async def test_openai_agents_with_chat_completions_and_responses_models(server):
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        OpenAIResponsesModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)
    seen: list[str] = []

    @function_tool
    def weather(city: str) -> str:
        """Get the weather of a city."""
        seen.append(city)
        return f"sunny in {city}"

    client = AsyncOpenAI(base_url=server.base + "/v1", api_key=server.keys["pro"], max_retries=0)
    for model_class in (OpenAIChatCompletionsModel, OpenAIResponsesModel):
        model = model_class(model=MODEL, openai_client=client)
        tool_agent = Agent(
            name="weather", instructions="Use the tool.", tools=[weather], model=model,
            model_settings=ModelSettings(tool_choice="required", max_tokens=80, temperature=0),
            tool_use_behavior="stop_on_first_tool",
        )  # fmt: skip
        result = await Runner.run(tool_agent, "Weather in Paris?")
        assert result.final_output.startswith("sunny in"), model_class
        settings = ModelSettings(max_tokens=120, temperature=0)
        typed = Agent(name="person", instructions="Make up a person.", output_type=Person,
                      model=model, model_settings=settings)  # fmt: skip
        assert isinstance((await Runner.run(typed, "A person, please.")).final_output, Person)
    assert len(seen) == 2
