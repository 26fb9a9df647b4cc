"""The OpenAI wire contract for chat and completions, through aiohttp's test client."""

from __future__ import annotations

import json

from llmserve.engine.fake import WORDS
from tests.support.api import chat_body, parse_sse


async def test_chat_completion_returns_an_openai_object(client):
    resp = await client.post("/v1/chat/completions", json=chat_body(max_tokens=4))
    assert resp.status == 200
    body = await resp.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == "fake"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": " ".join(WORDS[:4]) + " "}
    assert choice["finish_reason"] == "length"
    # "user: hello there\nassistant:" is 4 words = 4 prompt tokens (the fake's documented rule)
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}


async def test_natural_stop_reports_stop(app_client, config):
    from llmserve.engine.fake import FakeEngine

    client = await app_client(config, FakeEngine("fake", 256, output_tokens=2))
    body = await (await client.post("/v1/chat/completions", json=chat_body(max_tokens=10))).json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 2


async def test_stop_sequence_ends_generation(client):
    resp = await client.post("/v1/chat/completions", json=chat_body(max_tokens=10, stop="fox"))
    body = await resp.json()
    assert body["choices"][0]["message"]["content"] == "The quick brown "
    assert body["choices"][0]["finish_reason"] == "stop"


async def test_max_completion_tokens_is_honoured(client):
    resp = await client.post("/v1/chat/completions", json=chat_body(max_completion_tokens=2))
    assert (await resp.json())["usage"]["completion_tokens"] == 2


async def test_text_parts_and_developer_role_are_accepted(client, engine):
    messages = [
        {"role": "developer", "content": "be brief"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "you"}],
        },
    ]
    resp = await client.post(
        "/v1/chat/completions", json={"model": "fake", "messages": messages, "max_tokens": 1}
    )
    assert resp.status == 200
    assert engine.calls[-1].prompt.text == "system: be brief\nuser: hi \nyou\nassistant:"


async def test_streaming_chat_is_byte_exact_sse(client):
    resp = await client.post(
        "/v1/chat/completions",
        json=chat_body(max_tokens=2, stream=True, stream_options={"include_usage": True}),
    )
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert resp.headers["Cache-Control"] == "no-cache"
    assert resp.headers["X-Accel-Buffering"] == "no"
    events = parse_sse(await resp.read())
    assert events[-1] == b"data: [DONE]"
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    rid = chunks[0]["id"]
    assert rid.startswith("chatcmpl-")
    head = {"id": rid, "object": "chat.completion.chunk", "created": chunks[0]["created"],
            "model": "fake"}  # fmt: skip

    def chunk(delta, finish=None):
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**head, "choices": [choice], "usage": None}

    assert chunks == [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "The "}),
        chunk({"content": "quick "}),
        chunk({}, "length"),
        {**head, "choices": [],
         "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}},
    ]  # fmt: skip
    # byte-exact framing: compact JSON, one event per `data:` line, blank-line separated
    assert events[1] == (
        b'data: {"id":"'
        + rid.encode()
        + b'","object":"chat.completion.chunk","created":'
        + str(head["created"]).encode()
        + b',"model":"fake","choices":[{"index":0,"delta":'
        b'{"content":"The "},"logprobs":null,"finish_reason":null}],"usage":null}'
    )


async def test_stream_without_usage_option_has_no_usage_fields(client):
    resp = await client.post("/v1/chat/completions", json=chat_body(max_tokens=1, stream=True))
    events = parse_sse(await resp.read())
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_completion_non_streaming_and_streaming(client):
    resp = await client.post("/v1/completions", json={"model": "fake", "prompt": "a b c",
                                                      "max_tokens": 3})  # fmt: skip
    body = await resp.json()
    assert body["id"].startswith("cmpl-")
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "The quick brown "
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}

    resp = await client.post(
        "/v1/completions",
        json={"model": "fake", "prompt": ["x"], "max_tokens": 2, "stream": True},
    )
    events = parse_sse(await resp.read())
    texts = [json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]]
    assert texts == ["The ", "quick ", ""]
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


async def test_models_list_and_retrieve(client):
    body = await (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["fake"]
    assert body["data"][0]["object"] == "model"
    one = await client.get("/v1/models/fake")
    assert (await one.json())["id"] == "fake"
    missing = await client.get("/v1/models/other")
    assert missing.status == 404
    assert (await missing.json())["error"]["code"] == "model_not_found"


async def test_health_and_ready(client):
    assert (await (await client.get("/health")).json()) == {"status": "ok"}
    resp = await client.get("/ready")
    assert resp.status == 200
    assert (await resp.json())["status"] == "ready"


async def test_default_max_tokens_fills_the_context(app_client, config):
    from llmserve.engine.fake import FakeEngine

    engine = FakeEngine("fake", 16)
    client = await app_client(config, engine)
    body = await (await client.post("/v1/chat/completions", json=chat_body())).json()
    # 4 prompt tokens in a 16-token context leave 12 for the completion
    assert body["usage"]["completion_tokens"] == 12
    assert engine.calls[-1].options.max_tokens == 12


async def test_sampling_parameters_reach_the_engine(client, engine):
    await client.post("/v1/chat/completions", json=chat_body(
        max_tokens=1, temperature=0.5, top_p=0.9, seed=7, presence_penalty=0.1,
        frequency_penalty=-0.2, stop=["x", "y"], user="u1",
    ))  # fmt: skip
    options = engine.calls[-1].options
    assert (options.temperature, options.top_p, options.seed) == (0.5, 0.9, 7)
    assert (options.presence_penalty, options.frequency_penalty) == (0.1, -0.2)
    assert options.stop == ("x", "y")


async def test_vllm_extensions_are_accepted_and_passed_on(client, engine):
    resp = await client.post("/v1/completions", json={
        "model": "fake", "prompt": "x", "max_tokens": 2, "ignore_eos": True,
        "repetition_penalty": 1.1, "top_k": 5})  # fmt: skip
    assert resp.status == 200
    options = engine.calls[-1].options
    assert (options.ignore_eos, options.repetition_penalty, options.top_k) == (True, 1.1, 5)
