"""LoRA adapters and aliases on the real engine (vLLM on CPU, the tiny model): two adapters made
here in PEFT's format, served next to the base model; each name gives its own deterministic
greedy output in one batch of concurrent requests, on llmserve's fast path and on vLLM's own
handlers, over HTTP and through the official `openai` client. Then adapters loaded and unloaded
while it runs (the last tests: they change what the engine serves): a loaded adapter answers as
one from the config, streams in flight are untouched by a load and finish on an unloaded
adapter, which then leaves the engine; broken adapters are refused and change nothing. Names,
allow-lists and 403s on the fake engine: tests/test_api_models.py, tests/test_api_adapters.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_asyncio

from tests.engine.conftest import TINY_MODEL_VERSION, child_pids, kill_leftovers, tiny_engine_config

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="module")]

MESSAGES = [{"role": "user", "content": "Say something."}]
BASE, ALIASES = "tiny", {"gpt-4o-mini": "tiny", "gpt-poet": "poet"}
NAMES = ("tiny", "sql", "poet", "gpt-4o-mini", "gpt-poet")


@pytest.fixture(scope="module")
def adapter_dirs(request: pytest.FixtureRequest, tiny_model_dir: Path, tmp_path_factory) -> dict:
    """Two rank-8 adapters (q_proj, v_proj) with different random weights, built once."""
    from tests.support.tiny_lora import build_tiny_lora

    cache = getattr(request.config, "cache", None)
    root = cache.mkdir(f"{TINY_MODEL_VERSION}-lora-v1") if cache else tmp_path_factory.mktemp("l")
    return {name: str(build_tiny_lora(root / name, tiny_model_dir, seed))
            for name, seed in (("sql", 1), ("poet", 2))}  # fmt: skip


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def api(tiny_model_dir: Path, adapter_dirs: dict) -> AsyncIterator[SimpleNamespace]:
    from aiohttp.test_utils import TestClient, TestServer

    from llmserve.admission import AdmissionQueue
    from llmserve.config import Config
    from llmserve.engine.vllm import VLLMEngine
    from llmserve.server.app import build_app

    engine_config = tiny_engine_config(  # max_loras: room for 2 adapters loaded at run time
        tiny_model_dir, lora={"adapters": adapter_dirs, "max_loras": 4}, aliases=ALIASES,
        dtype="float32",
    )  # fmt: skip
    config = Config.model_validate({
        "engine": engine_config.model_dump(), "auth": {"enabled": False},
        "usage": {"ledger": None}, "queue": {"max_depth": 32},
    })  # fmt: skip
    before = child_pids()
    engine = VLLMEngine(config.engine)
    client = TestClient(TestServer(build_app(config, engine, admission=AdmissionQueue.from_config(
        config))))  # fmt: skip
    await client.start_server()
    try:
        deadline = asyncio.get_running_loop().time() + 240
        while (await client.get("/ready")).status != 200:
            assert asyncio.get_running_loop().time() < deadline, "the engine did not start"
            await asyncio.sleep(0.2)
        yield SimpleNamespace(client=client, engine=engine)
    finally:
        await client.close()
        left = kill_leftovers(before)
    assert not left, f"engine processes left: {left}"


def _chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, "max_tokens": 12, "temperature": 0,
            "ignore_eos": True, **extra}  # fmt: skip


async def _ask(api: SimpleNamespace, body: dict[str, Any]) -> dict[str, Any]:
    response = await api.client.post("/v1/chat/completions", json=body)
    assert response.status == 200, await response.text()
    return dict(await response.json())


async def test_models_lists_the_adapters_and_the_aliases(api) -> None:
    data = (await (await api.client.get("/v1/models")).json())["data"]
    assert [(m["id"], m["root"], m["parent"]) for m in data] == [
        ("tiny", "tiny", None), ("sql", "sql", "tiny"), ("poet", "poet", "tiny"),
        ("gpt-4o-mini", "tiny", None), ("gpt-poet", "poet", "tiny"),
    ]  # fmt: skip
    # vLLM's handlers hold the same adapters, with the fast path's ids
    registry = api.engine.frontend._state.openai_serving_models.lora_requests
    assert {n: (r.lora_int_id, r.base_model_name) for n, r in registry.items()} == {
        "sql": (1, "tiny"), "poet": (2, "tiny")}  # fmt: skip


async def test_each_name_gives_its_own_greedy_output_in_one_concurrent_batch(api) -> None:
    # every name twice, all at once, on the fast path (plain chat) and on vLLM's handlers
    # (logprobs is theirs), streamed and not
    bodies = [_chat(name) for name in NAMES for _ in range(2)]
    bodies += [_chat(name, logprobs=True) for name in ("sql", "gpt-poet")]
    answers = await asyncio.gather(
        *(_ask(api, body) for body in bodies),
        _stream(api, _chat("gpt-poet", stream=True, logprobs=True)),
    )
    streamed = answers.pop()
    texts: dict[str, set[str]] = {}
    for body, answer in zip(bodies, answers, strict=True):
        assert answer["model"] == body["model"]  # the name asked for, aliases included
        texts.setdefault(body["model"], set()).add(answer["choices"][0]["message"]["content"])
    assert all(len(seen) == 1 for seen in texts.values()), texts  # deterministic, both paths
    text = {name: seen.pop() for name, seen in texts.items()}
    assert len({text["tiny"], text["sql"], text["poet"]}) == 3, text  # each adapter its own
    assert text["gpt-4o-mini"] == text["tiny"] and text["gpt-poet"] == text["poet"]
    assert streamed == ({"gpt-poet"}, text["poet"])
    usage = await _ask(api, _chat("sql"))
    assert usage["usage"]["completion_tokens"] == 12
    # both paths ran one loaded copy of each adapter, under its stable id
    assert sorted(await api.engine._llm.list_loras()) == [1, 2]


async def _stream(api: SimpleNamespace, body: dict[str, Any]) -> tuple[set[str], str]:
    response = await api.client.post("/v1/chat/completions", json=body)
    assert response.status == 200, await response.text()
    raw = (await response.read()).decode()
    chunks = [json.loads(line[6:]) for line in raw.split("\n")
              if line.startswith("data: {")]  # fmt: skip
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return {c["model"] for c in chunks}, text


async def test_the_openai_client_reaches_adapters_and_aliases(api) -> None:
    from openai import AsyncOpenAI, NotFoundError

    base_url = str(api.client.make_url("/v1"))
    async with AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0) as openai:
        models = await openai.models.list()
        assert [m.id for m in models.data] == list(NAMES)
        fast = await _ask(api, _chat("poet"))
        for name in ("poet", "gpt-poet"):
            reply = await openai.chat.completions.create(
                model=name,
                messages=MESSAGES,
                max_tokens=12,
                temperature=0,  # type: ignore[arg-type]
                extra_body={"ignore_eos": True},
            )
            assert reply.model == name
            assert reply.choices[0].message.content == fast["choices"][0]["message"]["content"]
        completion, base = [
            await openai.completions.create(model=name, prompt="def main():", max_tokens=6,
                                            temperature=0, extra_body={"ignore_eos": True})
            for name in ("sql", "tiny")
        ]  # fmt: skip
        assert completion.model == "sql" and completion.choices[0].text != base.choices[0].text
        with pytest.raises(NotFoundError):
            await openai.chat.completions.create(model="nope", messages=MESSAGES, max_tokens=2)  # type: ignore[arg-type]


# -- adapters at run time (these change what the engine serves: keep them last) ---------------


@pytest.fixture(scope="module")
def more_adapters(request: pytest.FixtureRequest, tiny_model_dir: Path, tmp_path_factory) -> dict:
    """A third adapter, and broken ones: rank 16 (above the engine's 8), bias weights (vLLM
    refuses them), and one made for a model with another hidden size."""
    from tests.support.tiny_lora import build_tiny_lora

    cache = getattr(request.config, "cache", None)
    name = f"{TINY_MODEL_VERSION}-lora-extra-v1"
    root = cache.mkdir(name) if cache else tmp_path_factory.mktemp("x")
    other_base = root / "other-base-model"
    other_base.mkdir(exist_ok=True)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (other_base / "config.json").write_text(json.dumps({**config, "hidden_size": 128}))
    dirs = {
        "prose": build_tiny_lora(root / "prose", tiny_model_dir, 3),
        "rank16": build_tiny_lora(root / "rank16", tiny_model_dir, 4, rank=16),
        "bias": build_tiny_lora(root / "bias", tiny_model_dir, 5),
        "other-base": build_tiny_lora(root / "other-base", other_base, 6),
    }
    meta = json.loads((dirs["bias"] / "adapter_config.json").read_text())
    (dirs["bias"] / "adapter_config.json").write_text(json.dumps({**meta, "bias": "all"}))
    return {name: str(path) for name, path in dirs.items()}


async def _until_running(api: SimpleNamespace, streams: list[asyncio.Future[Any]]) -> None:
    """Until the engine runs every one of `streams`."""
    while api.engine.stats().running < len(streams):
        assert not any(stream.done() for stream in streams), "a stream ended too soon"
        await asyncio.sleep(0.01)


async def _admin(api: SimpleNamespace, action: str, **body: str) -> tuple[int, dict[str, Any]]:
    response = await api.client.post(f"/admin/models/{action}", json=body)
    return response.status, dict(await response.json())


async def _served_ids(api: SimpleNamespace) -> dict[str, int]:
    registry = api.engine.frontend._state.openai_serving_models.lora_requests
    return {name: lora.lora_int_id for name, lora in registry.items()}


async def test_an_adapter_loaded_while_streams_run_answers_as_one_from_the_config(
    api, adapter_dirs, more_adapters
) -> None:
    long = {"max_tokens": 400}
    reference = {name: (await _ask(api, _chat(name, **long)))["choices"][0]["message"]["content"]
                 for name in ("tiny", "sql", "gpt-poet")}  # fmt: skip
    streams = [asyncio.ensure_future(_stream(api, _chat(name, stream=True, **long)))
               for name in reference]  # fmt: skip
    await _until_running(api, streams)
    status, body = await _admin(api, "load", name="verse", path=adapter_dirs["poet"])
    assert (status, body["result"]) == (200, "loaded"), body
    assert api.engine._llm.get_num_unfinished_requests() > 0  # the load came mid-stream
    status, body = await _admin(api, "load", name="prose", path=more_adapters["prose"])
    assert status == 200, body
    for name, stream in zip(reference, streams, strict=True):
        assert await stream == ({name}, reference[name])  # intact, every token
    # the new names: poet's files under another name answer as poet, loaded at start, does;
    # a new adapter answers with its own text, the same on both request paths
    verse, prose = [
        {(await _ask(api, _chat(name, **extra)))["choices"][0]["message"]["content"]
         for extra in ({}, {}, {"logprobs": True})}
        for name in ("verse", "prose")
    ]  # fmt: skip
    poet = (await _ask(api, _chat("poet")))["choices"][0]["message"]["content"]
    base, sql = [(await _ask(api, _chat(n)))["choices"][0]["message"]["content"]
                 for n in ("tiny", "sql")]  # fmt: skip
    assert verse == {poet}
    assert len(prose) == 1 and prose.isdisjoint({base, sql, poet})
    data = (await (await api.client.get("/v1/models")).json())["data"]
    assert [m["id"] for m in data] == [*NAMES[:3], "verse", "prose", *NAMES[3:]]
    assert await _served_ids(api) == {"sql": 1, "poet": 2, "verse": 3, "prose": 4}
    assert sorted(await api.engine._llm.list_loras()) == [1, 2, 3, 4]


async def test_the_engine_holds_no_more_adapters_than_its_cpu_slots(api, more_adapters) -> None:
    status, body = await _admin(api, "load", name="one-too-many", path=more_adapters["prose"])
    assert (status, body["error"]["code"]) == (409, "adapter_limit")
    assert "engine.lora.max_loras, 4" in body["error"]["message"]


async def test_unloading_lets_requests_in_flight_finish_then_frees_the_adapter(api) -> None:
    long = {"max_tokens": 400}
    expected = (await _ask(api, _chat("prose", **long)))["choices"][0]["message"]["content"]
    # one stream on llmserve's fast path, one on vLLM's handlers (logprobs are theirs)
    streams = [asyncio.ensure_future(_stream(api, _chat("prose", stream=True, **long, **extra)))
               for extra in ({}, {"logprobs": True})]  # fmt: skip
    await _until_running(api, streams)
    status, body = await _admin(api, "unload", name="prose")
    assert (status, body["in_flight"]) == (200, 2), body
    refused = await api.client.post("/v1/chat/completions", json=_chat("prose"))
    assert refused.status == 404
    assert [await stream for stream in streams] == [({"prose"}, expected)] * 2
    deadline = asyncio.get_running_loop().time() + 30
    while 4 in await api.engine._llm.list_loras():  # vLLM frees it once both have finished
        assert asyncio.get_running_loop().time() < deadline, "the adapter stayed in the engine"
        await asyncio.sleep(0.1)
    assert await _served_ids(api) == {"sql": 1, "poet": 2, "verse": 3}
    status, body = await _admin(api, "unload", name="prose")
    assert (status, body["error"]["code"]) == (404, "model_not_found")


async def test_a_broken_adapter_is_refused_with_why_and_changes_nothing(
    api, more_adapters, tmp_path
) -> None:
    before = {n: (await _ask(api, _chat(n)))["choices"][0]["message"]["content"]
              for n in ("tiny", "sql", "verse")}  # fmt: skip
    loras = sorted(await api.engine._llm.list_loras())
    cases = {
        str(tmp_path / "nowhere"): "no LoRA adapter at",
        more_adapters["rank16"]: "rank 16 is above this engine's max_lora_rank (8;",
        more_adapters["other-base"]: "128 in features where the base model's q_proj has 256",
        more_adapters["bias"]: "vLLM could not load the adapter: Adapter bias is not supported",
    }
    for path, why in cases.items():
        status, body = await _admin(api, "load", name="broken", path=path)
        assert (status, body["error"]["code"]) == (400, "adapter_invalid"), body
        assert why in body["error"]["message"], body
    status, body = await _admin(api, "load", name="gpt-poet", path=more_adapters["prose"])
    assert (status, body["error"]["code"]) == (409, "model_exists")
    assert sorted(await api.engine._llm.list_loras()) == loras
    assert await _served_ids(api) == {"sql": 1, "poet": 2, "verse": 3}
    assert (await api.client.post("/v1/chat/completions", json=_chat("broken"))).status == 404
    after = {n: (await _ask(api, _chat(n)))["choices"][0]["message"]["content"] for n in before}
    assert after == before
