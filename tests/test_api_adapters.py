"""LoRA adapters loaded and unloaded while the server runs, on the fake engine: the admin routes
(POST /admin/models/load and /unload, vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter),
who may call them, their errors (nothing changes), the catalog they change (/v1/models,
allow-lists, aliases) at once, and requests in flight on an unloaded adapter. The real engine:
tests/engine/test_engine_lora.py; reloads: tests/test_reload_adapters.py; the CLI:
tests/test_cli_models.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from llmserve.config import Config
from llmserve.engine.base import LoadedAdapter
from llmserve.engine.fake import WORDS, FakeEngine
from tests.support.api import make_config, parse_sse

ADAPTERS = {"sql": "./adapters/sql"}
ALIASES = {"gpt-4o-mini": "fake", "gpt-sql": "sql"}


def _config(tmp_path: Path) -> Config:
    return make_config(tmp_path, engine={"lora": {"adapters": ADAPTERS}, "aliases": ALIASES})


def _chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            **extra}  # fmt: skip


async def _client(app_client, tmp_path: Path, engine: FakeEngine | None = None):
    config = _config(tmp_path)
    engine = engine or FakeEngine.from_config(config.engine)
    return await app_client(config, engine), engine


async def _models(client) -> list[str]:
    return [m["id"] for m in (await (await client.get("/v1/models")).json())["data"]]


async def _load(client, name: str, path: str = "/srv/adapters/x"):
    return await client.post("/admin/models/load", json={"name": name, "path": path})


async def _error(response) -> dict[str, Any]:
    return dict((await response.json())["error"])


async def test_a_loaded_adapter_is_a_model_at_once_and_answers_with_its_own_output(
    app_client, tmp_path
) -> None:
    client, engine = await _client(app_client, tmp_path)
    loaded = await _load(client, "poet", "/srv/adapters/poet")
    assert loaded.status == 200, await loaded.text()
    assert await loaded.json() == {
        "result": "loaded", "model": "poet", "path": "/srv/adapters/poet",
        "message": "serving adapter 'poet' from /srv/adapters/poet",
    }  # fmt: skip
    assert await _models(client) == ["fake", "sql", "poet", "gpt-4o-mini", "gpt-sql"]
    card = await (await client.get("/v1/models/poet")).json()
    assert (card["root"], card["parent"]) == ("poet", "fake")
    reply = await client.post("/v1/chat/completions", json=_chat("poet"))
    assert reply.status == 200
    body = await reply.json()
    assert body["model"] == "poet"
    # the second adapter loaded: its output starts 10 words in (engine/fake.py)
    assert body["choices"][0]["message"]["content"] == " ".join(WORDS[10:14]) + " "
    assert engine.calls[-1].options.adapter == "poet"


async def test_vllms_own_load_and_unload_shapes_are_accepted(app_client, tmp_path) -> None:
    client, _ = await _client(app_client, tmp_path)
    loaded = await client.post("/v1/load_lora_adapter",
                               json={"lora_name": "poet", "lora_path": "/srv/poet"})  # fmt: skip
    assert loaded.status == 200
    assert await loaded.text() == "Success: LoRA adapter 'poet' added successfully."
    assert "poet" in await _models(client)
    inplace = await client.post("/v1/load_lora_adapter", json={
        "lora_name": "poet", "lora_path": "/srv/poet", "load_inplace": True})  # fmt: skip
    assert inplace.status == 400 and (await _error(inplace))["param"] == "load_inplace"
    unloaded = await client.post("/v1/unload_lora_adapter", json={"lora_name": "poet"})
    assert unloaded.status == 200
    assert await unloaded.text() == "Success: LoRA adapter 'poet' removed successfully."
    assert "poet" not in await _models(client)
    gone = await client.post("/v1/unload_lora_adapter", json={"lora_name": "poet"})
    assert gone.status == 404


@pytest.mark.parametrize(
    ("name", "what"),
    [("fake", "the base model"), ("sql", "an adapter"), ("gpt-sql", "an alias of 'sql'")],
)
async def test_a_name_already_served_is_refused(app_client, tmp_path, name, what) -> None:
    client, engine = await _client(app_client, tmp_path)
    refused = await _load(client, name)
    assert refused.status == 409
    error = await _error(refused)
    assert (error["code"], error["param"]) == ("model_exists", "name")
    assert f"it is {what}" in error["message"]
    assert engine.adapters == ("sql",)
    assert await _models(client) == ["fake", "sql", "gpt-4o-mini", "gpt-sql"]


async def test_a_broken_adapter_is_a_clear_error_and_changes_nothing(app_client, tmp_path) -> None:
    client, engine = await _client(app_client, tmp_path)
    engine.adapter_errors["/srv/broken"] = "rank 64 is above engine.lora.max_lora_rank (8)"
    refused = await _load(client, "broken", "/srv/broken")
    assert refused.status == 400
    error = await _error(refused)
    assert (error["code"], error["param"]) == ("adapter_invalid", "path")
    assert "rank 64 is above engine.lora.max_lora_rank (8)" in error["message"]
    assert await _models(client) == ["fake", "sql", "gpt-4o-mini", "gpt-sql"]
    assert (await client.post("/v1/chat/completions", json=_chat("broken"))).status == 404


async def test_the_engine_at_its_adapter_limit_refuses_a_load(app_client, tmp_path) -> None:
    engine = FakeEngine("fake", 256, adapters=("sql",), max_adapters=2)
    client, _ = await _client(app_client, tmp_path, engine)
    assert (await _load(client, "one")).status == 200
    refused = await _load(client, "two")
    assert refused.status == 409 and (await _error(refused))["code"] == "adapter_limit"
    assert (await client.post("/admin/models/unload", json={"name": "one"})).status == 200
    assert (await _load(client, "two")).status == 200


@pytest.mark.parametrize(
    ("body", "param"),
    [({"path": "/x"}, "name"), ({"name": "a"}, "path"), ({"name": " a", "path": "/x"}, "name"),
     ({"name": 3, "path": "/x"}, "name")],
)  # fmt: skip
async def test_a_load_without_a_usable_name_or_path_is_400(app_client, tmp_path, body, param):
    client, _ = await _client(app_client, tmp_path)
    refused = await client.post("/admin/models/load", json=body)
    assert refused.status == 400 and (await _error(refused))["param"] == param
    not_json = await client.post("/admin/models/load", data=b"{oops")
    assert not_json.status == 400


async def test_unloading_an_unknown_name_is_404_and_an_aliased_adapter_409(app_client, tmp_path):
    client, engine = await _client(app_client, tmp_path)
    for name, what in (("nope", "not a model this server serves"), ("fake", "the base model"),
                       ("gpt-sql", "an alias of 'sql'")):  # fmt: skip
        missing = await client.post("/admin/models/unload", json={"name": name})
        assert missing.status == 404, name
        error = await _error(missing)
        assert error["code"] == "model_not_found" and what in error["message"]
    aliased = await client.post("/admin/models/unload", json={"name": "sql"})
    assert aliased.status == 409
    error = await _error(aliased)
    assert error["code"] == "adapter_in_use" and "gpt-sql" in error["message"]
    assert engine.adapters == ("sql",)


async def test_unloading_lets_requests_in_flight_finish_and_refuses_new_ones(
    app_client, tmp_path
) -> None:
    engine = FakeEngine("fake", 256, adapters=("sql",), tokens_per_second=200)
    client, _ = await _client(app_client, tmp_path, engine)
    assert (await _load(client, "poet")).status == 200
    stream = await client.post("/v1/chat/completions",
                               json=_chat("poet", max_tokens=40, stream=True))  # fmt: skip
    first = await stream.content.readuntil(b"\n\n")
    assert first.startswith(b"data: ")
    unloaded = await client.post("/admin/models/unload", json={"name": "poet"})
    assert unloaded.status == 200
    answer = await unloaded.json()
    assert (answer["result"], answer["in_flight"]) == ("unloaded", 1)
    assert "1 request(s) in flight finish on it first" in answer["message"]
    refused = await client.post("/v1/chat/completions", json=_chat("poet"))
    assert refused.status == 404
    assert (await _error(refused))["code"] == "model_not_found"
    assert "poet" not in await _models(client)
    events = parse_sse(first + await stream.read())
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert events[-1] == b"data: [DONE]"
    assert text == "".join(f"{WORDS[(10 + i) % len(WORDS)]} " for i in range(40))  # intact
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


class SlowLoads(FakeEngine):
    """Loading an adapter takes until the test says so."""

    def __init__(self) -> None:
        super().__init__("fake", 256, adapters=("sql",))
        self.release = asyncio.Event()

    async def load_adapter(self, name: str, path: str) -> LoadedAdapter:
        await self.release.wait()
        return await super().load_adapter(name, path)


async def test_the_catalog_changes_only_once_the_engine_has_the_adapter(app_client, tmp_path):
    engine = SlowLoads()
    client, _ = await _client(app_client, tmp_path, engine)
    loading = asyncio.ensure_future(_load(client, "poet"))
    await asyncio.sleep(0.05)
    assert "poet" not in await _models(client)
    assert (await client.post("/v1/chat/completions", json=_chat("poet"))).status == 404
    clash = asyncio.ensure_future(_load(client, "poet"))  # waits its turn, then clashes
    engine.release.set()
    assert (await loading).status == 200
    assert (await clash).status == 409
    assert "poet" in await _models(client)


# -- who may change the models -----------------------------------------------------------------


async def test_only_an_admin_changes_the_models_and_keys_see_only_their_own(tmp_path) -> None:
    from aiohttp.test_utils import TestClient, TestServer
    from prometheus_client import CollectorRegistry

    from llmserve.auth.keys import KeyStore
    from llmserve.server.components import build_components

    config = Config.model_validate({
        "engine": {"kind": "fake", "served_model_name": "fake", "max_model_len": 256,
                   "lora": {"adapters": ADAPTERS}, "aliases": ALIASES},
        "auth": {"keys": str(tmp_path / "keys")},
        "server": {"admin_port": 1},  # the admin app is built; it is not listening here
        "limits": {"state_dir": str(tmp_path / "limits")},
        "usage": {"ledger": None},
    })  # fmt: skip
    store = KeyStore(tmp_path / "keys")
    _, admin = store.create("ops", admin=True)
    _, team_sql = store.create("team-sql", models=["sql"])
    _, team_poet = store.create("team-poet", models=["poet"])  # made before the adapter exists
    components = build_components(config, registry=CollectorRegistry())
    assert components.admin_app is not None

    async def status(client: TestClient, key: str | None, path: str, body: Any) -> int:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return (await client.post(path, json=body, headers=headers)).status

    async def listed(client: TestClient, key: str) -> list[str]:
        response = await client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        return [m["id"] for m in (await response.json())["data"]]

    load = {"name": "poet", "path": "/srv/poet"}
    async with TestClient(TestServer(components.app)) as api:
        assert await status(api, team_poet, "/v1/chat/completions", _chat("poet")) == 404
        for path in ("/admin/models/load", "/v1/load_lora_adapter"):
            assert await status(api, None, path, load) == 401
            assert await status(api, team_sql, path, load) == 403
        assert await status(api, admin, "/admin/models/load", load) == 200
        assert await listed(api, team_sql) == ["sql", "gpt-sql"]  # the new one is not theirs
        assert await listed(api, team_poet) == ["poet"]
        assert await status(api, team_sql, "/v1/chat/completions", _chat("poet")) == 403
        assert await status(api, team_poet, "/v1/chat/completions", _chat("poet")) == 200
        assert await status(api, team_poet, "/v1/chat/completions", _chat("sql")) == 403
        assert await status(api, team_poet, "/admin/models/unload", {"name": "poet"}) == 403
        async with TestClient(TestServer(components.admin_app)) as admin_port:  # no credential
            assert await status(admin_port, None, "/admin/models/unload", {"name": "poet"}) == 200
            assert await status(admin_port, None, "/v1/load_lora_adapter",
                                {"lora_name": "poet", "lora_path": "/srv/poet"}) == 200  # fmt: skip
        assert await listed(api, team_poet) == ["poet"]  # one catalog for both listeners
