"""Model names on the fake engine: LoRA adapters and aliases (engine.lora, engine.aliases), what
/v1/models lists for each caller, which requests a model allow-list lets through (403
model_not_allowed otherwise), and the name responses give, on the fast path and on the engine's
own frontend. The real engine's adapters: tests/engine/test_engine_lora.py."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pydantic import ValidationError

from llmserve.api.models import ModelRename
from llmserve.auth.principal import Principal
from llmserve.config import Config, EngineConfig
from llmserve.engine.base import GenerationGate, JSONReply, StreamReply
from llmserve.engine.catalog import ModelCatalog, ServedModel
from llmserve.engine.fake import WORDS, FakeEngine
from llmserve.request_state import PRINCIPAL
from tests.support.api import make_config, parse_sse

ADAPTERS = {"sql": "./adapters/sql", "poet": "./adapters/poet"}
ALIASES = {"gpt-4o-mini": "fake", "gpt-sql": "sql"}

# who calls: a principal per X-Test-Caller header (the real keys and tokens: see the last tests)
CALLERS = {
    "all": Principal(id="all"),
    "base": Principal(id="base", models=frozenset({"fake"})),
    "sql": Principal(id="sql", models=frozenset({"sql"})),
    "mini": Principal(id="mini", models=frozenset({"gpt-4o-mini"})),
}


@web.middleware
async def fixed_principals(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
    request[PRINCIPAL] = CALLERS[request.headers.get("X-Test-Caller", "all")]
    return await handler(request)


def _config(tmp_path: Path, **engine: Any) -> Config:
    settings = {"lora": {"adapters": ADAPTERS}, "aliases": ALIASES, **engine}
    return make_config(tmp_path, engine=settings)


def _chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            **extra}  # fmt: skip


async def _client(app_client, tmp_path: Path, engine: FakeEngine | None = None):
    config = _config(tmp_path)
    engine = engine or FakeEngine.from_config(config.engine)
    return await app_client(config, engine, auth_middleware=fixed_principals), engine


def _as(caller: str) -> dict[str, str]:
    return {"X-Test-Caller": caller}


# -- the catalog ---------------------------------------------------------------------------------


def test_the_catalog_resolves_base_adapters_and_aliases() -> None:
    catalog = ModelCatalog("fake", ADAPTERS, ALIASES)
    assert [e.name for e in catalog.entries] == ["fake", "sql", "poet", "gpt-4o-mini", "gpt-sql"]
    assert catalog.get("fake") == ServedModel("fake", "fake")
    assert catalog.get("sql") == ServedModel("sql", "sql", adapter="sql", parent="fake")
    assert catalog.get("gpt-4o-mini") == ServedModel("gpt-4o-mini", "fake", alias=True)
    assert catalog.get("gpt-sql") == ServedModel("gpt-sql", "sql", "sql", "fake", alias=True)
    assert catalog.get("nope") is None


@pytest.mark.parametrize(
    ("models", "visible"),
    [
        (None, ["fake", "sql", "poet", "gpt-4o-mini", "gpt-sql"]),
        ({"fake"}, ["fake", "gpt-4o-mini"]),  # an alias is covered by its model
        ({"sql"}, ["sql", "gpt-sql"]),  # an adapter is not covered by the base model, and back
        ({"gpt-4o-mini"}, ["gpt-4o-mini"]),  # an alias on the list covers only itself
        ({"gpt-sql", "poet"}, ["poet", "gpt-sql"]),
        (set(), []),
    ],
)
def test_an_allow_list_covers_the_names_it_lists_and_their_aliases(models, visible) -> None:
    catalog = ModelCatalog("fake", ADAPTERS, ALIASES)
    allowed = None if models is None else frozenset(models)
    assert [e.name for e in catalog.visible_to(allowed)] == visible


def test_the_config_refuses_names_that_clash_or_dangle() -> None:
    def engine(**settings: Any) -> EngineConfig:
        return EngineConfig.model_validate({"served_model_name": "base", **settings})

    engine(lora={"adapters": {"a": "/x"}}, aliases={"b": "a", "c": "base"})  # fine
    cases = {
        "not a served model": {"aliases": {"b": "nope"}},
        "already the name of a served model": {
            "lora": {"adapters": {"a": "/x"}},
            "aliases": {"a": "base"},
        },
        "the base model's name": {"lora": {"adapters": {"base": "/x"}}},
        "not a usable model name": {"aliases": {" b": "base"}},
        "must be one of 1, 8, 16": {"lora": {"adapters": {"a": "/x"}, "max_lora_rank": 4}},
        "must be at least max_loras": {
            "lora": {"adapters": {"a": "/x", "b": "/y"}, "max_cpu_loras": 1}
        },
    }
    for message, settings in cases.items():
        with pytest.raises(ValidationError, match=message):
            engine(**settings)
    with pytest.raises(ValidationError, match="is not a served model"):
        engine(aliases={"b": "c", "c": "base"})  # an alias of an alias


def test_the_rename_touches_only_model_members() -> None:
    rename = ModelRename("sql", "gpt-sql")
    vllm_json = '{"id":"c1","model":"sql","choices":[{"text":"say \\"model\\":\\"sql\\""}]}'
    renamed = json.loads(rename.text(vllm_json))
    assert renamed["model"] == "gpt-sql"
    assert renamed["choices"][0]["text"] == 'say "model":"sql"'  # the generated text is kept
    assert rename.body(vllm_json.encode()) == rename.text(vllm_json).encode()


# -- /v1/models ----------------------------------------------------------------------------------


async def test_models_lists_adapters_with_their_parent_and_aliases_with_their_root(
    app_client, tmp_path
) -> None:
    client, _ = await _client(app_client, tmp_path)
    data = (await (await client.get("/v1/models")).json())["data"]
    cards = {m["id"]: (m["root"], m["parent"]) for m in data}
    assert cards == {
        "fake": ("fake", None),
        "sql": ("sql", "fake"),
        "poet": ("poet", "fake"),
        "gpt-4o-mini": ("fake", None),
        "gpt-sql": ("sql", "fake"),
    }
    assert all(m["object"] == "model" and m["owned_by"] == "llmserve" for m in data)
    one = await (await client.get("/v1/models/gpt-sql")).json()
    assert (one["id"], one["root"], one["parent"]) == ("gpt-sql", "sql", "fake")


async def test_models_lists_only_what_the_caller_may_use(app_client, tmp_path) -> None:
    client, _ = await _client(app_client, tmp_path)
    for caller, expected in (("base", ["fake", "gpt-4o-mini"]), ("sql", ["sql", "gpt-sql"]),
                             ("mini", ["gpt-4o-mini"])):  # fmt: skip
        listed = await (await client.get("/v1/models", headers=_as(caller))).json()
        assert [m["id"] for m in listed["data"]] == expected, caller
    hidden = await client.get("/v1/models/sql", headers=_as("base"))
    assert hidden.status == 404
    assert (await hidden.json())["error"]["code"] == "model_not_found"


# -- generation on the fast path -----------------------------------------------------------------


async def test_each_name_runs_its_own_model_and_the_response_names_what_was_asked(
    app_client, tmp_path
) -> None:
    client, engine = await _client(app_client, tmp_path)
    texts = {}
    for model in ("fake", "sql", "poet", "gpt-4o-mini", "gpt-sql"):
        response = await client.post("/v1/chat/completions", json=_chat(model))
        assert response.status == 200, await response.text()
        body = await response.json()
        assert body["model"] == model
        texts[model] = body["choices"][0]["message"]["content"]
    adapters = [call.options.adapter for call in engine.calls]
    assert adapters == [None, "sql", "poet", None, "sql"]
    assert texts["fake"] == " ".join(WORDS[:4]) + " "
    assert len({texts["fake"], texts["sql"], texts["poet"]}) == 3
    assert texts["gpt-4o-mini"] == texts["fake"]
    assert texts["gpt-sql"] == texts["sql"]


async def test_streamed_chunks_and_text_completions_name_the_alias(app_client, tmp_path) -> None:
    client, engine = await _client(app_client, tmp_path)
    stream = await client.post("/v1/chat/completions", json=_chat("gpt-sql", stream=True))
    chunks = [json.loads(e[len(b"data: ") :]) for e in parse_sse(await stream.read())[:-1]]
    assert chunks and {c["model"] for c in chunks} == {"gpt-sql"}
    poem = {"model": "poet", "prompt": "x", "max_tokens": 2}
    completion = await client.post("/v1/completions", json=poem)
    assert (await completion.json())["model"] == "poet"
    assert [c.options.adapter for c in engine.calls] == ["sql", "poet"]


@pytest.mark.parametrize(
    ("caller", "model", "status"),
    [
        ("base", "fake", 200),
        ("base", "gpt-4o-mini", 200),
        ("base", "sql", 403),
        ("base", "gpt-sql", 403),
        ("sql", "sql", 200),
        ("sql", "gpt-sql", 200),
        ("sql", "fake", 403),
        ("sql", "gpt-4o-mini", 403),
        ("mini", "gpt-4o-mini", 200),
        ("mini", "fake", 403),
        ("all", "nope", 404),
    ],
)
async def test_a_model_the_caller_may_not_use_is_403(app_client, tmp_path, caller, model, status):
    client, engine = await _client(app_client, tmp_path)
    response = await client.post("/v1/chat/completions", json=_chat(model), headers=_as(caller))
    assert response.status == status, await response.text()
    if status != 200:
        error = (await response.json())["error"]
        assert error["code"] == {403: "model_not_allowed", 404: "model_not_found"}[status]
        assert error["param"] == "model"
        assert not engine.calls


async def test_without_adapters_or_aliases_only_the_base_model_is_served(app_client, tmp_path):
    config = make_config(tmp_path)
    client = await app_client(config, FakeEngine.from_config(config.engine),
                              auth_middleware=fixed_principals)  # fmt: skip
    listed = await (await client.get("/v1/models")).json()
    assert listed["data"] == [{"id": "fake", "object": "model", "created": listed["data"][0][
        "created"], "owned_by": "llmserve", "root": "fake", "parent": None}]  # fmt: skip
    assert (await client.post("/v1/chat/completions", json=_chat("sql"))).status == 404


# -- the engine's own frontend (vLLM's handlers) ---------------------------------------------------


class EchoFrontend:
    """Answers as vLLM's handlers do: every response and chunk names the `model` it was given."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def request_fields(self, route: str) -> frozenset[str]:
        return frozenset({"model", "messages", "max_tokens", "n", "stream", "tools", "input",
                          "prompt", "max_output_tokens"})  # fmt: skip

    async def handle(self, route: str, body: dict[str, Any], gate: GenerationGate) -> Any:
        self.bodies.append(dict(body))
        model = body["model"]
        admitted = await gate.enter(3, 4, 1, 0)
        admitted.on_tokens(1)
        admitted.on_finish("stop")
        await admitted.close()
        if body.get("stream"):
            return StreamReply(self._events(model))
        return JSONReply(json.dumps({"object": "chat.completion", "model": model,
                                     "choices": [{"text": f'"model": "{model}"'}]},
                                    separators=(",", ":")).encode())  # fmt: skip

    async def _events(self, model: str) -> AsyncIterator[str]:
        for i in range(2):
            yield f'data: {{"id":"c","model":"{model}","choices":[{{"index":{i}}}]}}\n\n'
        yield "data: [DONE]\n\n"


class EngineWithFrontend(FakeEngine):
    def __init__(self, frontend: EchoFrontend, config: EngineConfig) -> None:
        super().__init__("fake", 256, adapters=tuple(config.lora.adapters))
        self._echo = frontend

    @property
    def frontend(self) -> EchoFrontend:  # type: ignore[override]
        return self._echo


async def test_the_frontend_gets_the_aliased_model_and_answers_with_the_alias(
    app_client, tmp_path
) -> None:
    frontend = EchoFrontend()
    config = _config(tmp_path)
    client, _ = await _client(app_client, tmp_path, EngineWithFrontend(frontend, config.engine))
    tools = [{"type": "function", "function": {"name": "f"}}]  # not the fast path's
    for model in ("gpt-sql", "sql", "gpt-4o-mini"):
        response = await client.post("/v1/chat/completions", json=_chat(model, tools=tools))
        assert response.status == 200, await response.text()
        body = await response.json()
        assert body["model"] == model
        assert body["choices"][0]["text"] == f'"model": "{frontend.bodies[-1]["model"]}"'
    assert [b["model"] for b in frontend.bodies] == ["sql", "sql", "fake"]
    stream = await client.post("/v1/chat/completions",
                               json=_chat("gpt-sql", tools=tools, stream=True))  # fmt: skip
    events = parse_sse(await stream.read())
    assert [json.loads(e[6:])["model"] for e in events[:-1]] == ["gpt-sql", "gpt-sql"]
    assert frontend.bodies[-1]["model"] == "sql"
    refused = await client.post("/v1/responses", json={"model": "gpt-sql", "input": "x"},
                                headers=_as("base"))  # fmt: skip
    assert refused.status == 403
    assert (await refused.json())["error"]["code"] == "model_not_allowed"
    responses = await client.post("/v1/responses", json={"model": "gpt-4o-mini", "input": "x"},
                                  headers=_as("base"))  # fmt: skip
    assert responses.status == 200 and (await responses.json())["model"] == "gpt-4o-mini"


# -- real keys and tokens ------------------------------------------------------------------------


async def test_key_and_token_allow_lists_cover_adapters_and_aliases(tmp_path) -> None:
    from aiohttp.test_utils import TestClient, TestServer
    from prometheus_client import CollectorRegistry

    from llmserve.auth.jwt import mint_token
    from llmserve.auth.keys import KeyStore
    from llmserve.server.components import build_components

    secret = "s" * 48
    config = Config.model_validate({
        "engine": {"kind": "fake", "served_model_name": "fake", "max_model_len": 256,
                   "lora": {"adapters": ADAPTERS}, "aliases": ALIASES},
        "auth": {"keys": str(tmp_path / "keys"), "jwt": {"secret": secret}},
        "limits": {"state_dir": str(tmp_path / "limits")},
        "usage": {"ledger": None},
    })  # fmt: skip
    store = KeyStore(tmp_path / "keys")
    _, private = store.create("team-sql", models=["sql"])  # the adapter is private to this key
    _, anyone = store.create("everyone")
    assert config.auth.jwt is not None
    token = mint_token(config.auth.jwt, "app", models=["gpt-4o-mini"])
    components = build_components(config, registry=CollectorRegistry())
    async with TestClient(TestServer(components.app)) as client:

        async def listed(credential: str) -> list[str]:
            response = await client.get("/v1/models", headers=_bearer(credential))
            return [m["id"] for m in (await response.json())["data"]]

        async def status(credential: str, model: str) -> int:
            response = await client.post("/v1/chat/completions", json=_chat(model),
                                         headers=_bearer(credential))  # fmt: skip
            return response.status

        assert await listed(private) == ["sql", "gpt-sql"]
        assert await listed(anyone) == ["fake", "sql", "poet", "gpt-4o-mini", "gpt-sql"]
        assert await listed(token) == ["gpt-4o-mini"]
        assert [await status(private, m) for m in ("sql", "gpt-sql", "fake", "poet")] == [
            200, 200, 403, 403]  # fmt: skip
        assert [await status(token, m) for m in ("gpt-4o-mini", "fake", "sql")] == [200, 403, 403]
        assert await status(anyone, "poet") == 200


def _bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}
