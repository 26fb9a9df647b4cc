"""A reload applies the LoRA adapters and aliases of the config file (engine.lora.adapters,
engine.aliases): entries added are loaded, entries removed unloaded, a changed path replaces
the adapter; adapters loaded at run time stay; an adapter that cannot be loaded makes the
reload `refused` and changes nothing; the other engine.lora settings still need a restart.
On the fake engine, with the Reloader driven directly (SIGHUP and `llmserve reload` reach the
same Reloader: tests/test_server_reload.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmserve.app_state import GATEWAY
from llmserve.config import Config, parse_config, restart_only
from llmserve.engine.fake import WORDS, FakeEngine
from llmserve.errors import ConfigError
from llmserve.server.reload import Reloader


def _settings(tmp_path: Path) -> dict[str, Any]:
    return {
        "engine": {"kind": "fake", "served_model_name": "fake", "max_model_len": 256,
                   "lora": {"adapters": {"sql": "/srv/sql"}}, "aliases": {"gpt-sql": "sql"}},
        "auth": {"enabled": False},
        "limits": {"state_dir": str(tmp_path / "limits"), "default_tier": "t",
                   "tiers": {"t": {"requests_per_minute": 100}}},
        "usage": {"ledger": None},
    }  # fmt: skip


class Server:
    """An app on the fake engine, its config file, and a Reloader of that file."""

    def __init__(self, client: Any, engine: FakeEngine, path: Path, config: Config) -> None:
        self.client, self.engine, self.path = client, engine, path
        self.reloader = Reloader(client.app, config, source=path)

    def edit(self, change: Callable[[dict[str, Any]], object]) -> None:
        data = yaml.safe_load(self.path.read_text())
        change(data)
        self.path.write_text(yaml.safe_dump(data, sort_keys=False))

    async def models(self) -> list[str]:
        listed = await (await self.client.get("/v1/models")).json()
        return [m["id"] for m in listed["data"]]

    async def text(self, model: str) -> str:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        reply = await self.client.post("/v1/chat/completions", json=body)
        assert reply.status == 200, await reply.text()
        return str((await reply.json())["choices"][0]["message"]["content"])

    async def status(self, model: str) -> int:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        return (await self.client.post("/v1/chat/completions", json=body)).status


@pytest.fixture
async def server(app_client, tmp_path: Path) -> Server:
    path = tmp_path / "llmserve.yaml"
    path.write_text(yaml.safe_dump(_settings(tmp_path), sort_keys=False))
    config = parse_config(path.read_text(), str(path))
    engine = FakeEngine.from_config(config.engine)
    return Server(await app_client(config, engine), engine, path, config)


def _words(start: int) -> str:
    return "".join(f"{WORDS[(start + i) % len(WORDS)]} " for i in range(3))


async def test_adapters_and_aliases_added_to_the_file_are_served_after_a_reload(server) -> None:
    server.edit(lambda d: (d["engine"]["lora"]["adapters"].update(poet="/srv/poet"),
                           d["engine"]["aliases"].update({"gpt-poet": "poet"})))  # fmt: skip
    result = await server.reloader.reload()
    assert result.outcome == "applied", result.message
    assert result.changed == ("engine.aliases.gpt-poet", "engine.lora.adapters.poet")
    assert await server.models() == ["fake", "sql", "poet", "gpt-sql", "gpt-poet"]
    assert await server.text("gpt-poet") == await server.text("poet") == _words(10)
    assert server.engine.adapters == ("sql", "poet")


async def test_adapters_removed_from_the_file_are_unloaded(server) -> None:
    server.edit(lambda d: (d["engine"]["lora"].update(adapters={}),
                           d["engine"].update(aliases={"gpt-4o-mini": "fake"})))  # fmt: skip
    result = await server.reloader.reload()
    assert result.outcome == "applied", result.message
    assert await server.models() == ["fake", "gpt-4o-mini"]
    assert await server.status("sql") == 404 and await server.status("gpt-sql") == 404
    assert server.engine.adapters == ()


async def test_a_new_path_in_the_file_replaces_the_adapter(server) -> None:
    assert await server.text("sql") == _words(5)
    server.edit(lambda d: d["engine"]["lora"]["adapters"].update(sql="/srv/sql-v2"))
    assert (await server.reloader.reload()).outcome == "applied"
    assert await server.text("sql") == await server.text("gpt-sql") == _words(10)  # loaded anew
    assert server.client.app[GATEWAY].models.adapters == {"sql": "/srv/sql-v2"}


async def test_an_adapter_that_cannot_load_refuses_the_whole_reload(server) -> None:
    server.engine.adapter_errors["/srv/broken"] = "no LoRA adapter at /srv/broken"
    server.edit(lambda d: (d["engine"]["lora"]["adapters"].update(poet="/srv/poet",
                                                                  broken="/srv/broken"),
                           d["engine"]["lora"]["adapters"].pop("sql"),
                           d["engine"].update(aliases={}),
                           d["limits"]["tiers"]["t"].update(requests_per_minute=5)))  # fmt: skip
    result = await server.reloader.reload()
    assert result.outcome == "refused"
    assert result.message == ("nothing changed: engine.lora.adapters.broken: Adapter 'broken': "
                              "no LoRA adapter at /srv/broken.")  # fmt: skip
    assert await server.models() == ["fake", "sql", "gpt-sql"]  # poet was discarded, sql kept
    assert server.engine.adapters == ("sql",)
    assert server.reloader.config.limits.tiers["t"].requests_per_minute == 100
    del server.engine.adapter_errors["/srv/broken"]
    assert (await server.reloader.reload()).outcome == "applied"  # the same file, now loadable
    assert await server.models() == ["fake", "poet", "broken"]


async def test_a_failure_after_the_loads_discards_them(server, monkeypatch) -> None:
    async def refuse(new: Config) -> None:  # as the authenticator does with a broken key set
        raise ConfigError("auth.jwt: the new key set cannot be read")

    monkeypatch.setattr(server.reloader, "_reconfigure", refuse)
    server.edit(lambda d: d["engine"]["lora"]["adapters"].update(poet="/srv/poet"))
    result = await server.reloader.reload()
    assert (result.outcome, result.message) == (
        "refused", "nothing changed: auth.jwt: the new key set cannot be read")  # fmt: skip
    assert await server.models() == ["fake", "sql", "gpt-sql"]
    assert server.engine.adapters == ("sql",)


async def test_run_time_loads_stay_and_a_reload_applies_only_what_the_file_changed(
    server,
) -> None:
    client = server.client
    loaded = await client.post("/admin/models/load", json={"name": "poet", "path": "/srv/poet"})
    assert loaded.status == 200
    server.edit(lambda d: d["limits"]["tiers"]["t"].update(requests_per_minute=7))
    assert (await server.reloader.reload()).outcome == "applied"
    assert await server.models() == ["fake", "sql", "poet", "gpt-sql"]  # poet stays
    # an adapter of the file unloaded at run time stays unloaded while its entry is unchanged
    server.edit(lambda d: d["engine"].update(aliases={}))
    assert (await server.reloader.reload()).outcome == "applied"
    assert (await client.post("/admin/models/unload", json={"name": "sql"})).status == 200
    server.edit(lambda d: d["limits"]["tiers"]["t"].update(requests_per_minute=8))
    assert (await server.reloader.reload()).outcome == "applied"
    assert await server.models() == ["fake", "poet"]
    # an alias of it, added to the file now, is refused: it would name nothing
    server.edit(lambda d: d["engine"].update(aliases={"gpt-sql": "sql"}))
    refused = await server.reloader.reload()
    assert refused.outcome == "refused"
    assert "engine.aliases.gpt-sql: the adapter 'sql' is not loaded" in refused.message
    # a name loaded at run time, now added to the file from the same path: nothing to load
    server.edit(lambda d: (d["engine"].update(aliases={}),
                           d["engine"]["lora"]["adapters"].update(poet="/srv/poet")))  # fmt: skip
    before = server.engine.calls
    assert (await server.reloader.reload()).outcome == "applied"
    assert await server.text("poet") == _words(10) and server.engine.calls is before


async def test_other_lora_settings_still_need_a_restart(server) -> None:
    assert not restart_only("engine.lora.adapters.sql") and not restart_only("engine.aliases.a")
    for name in ("engine.lora.max_loras", "engine.lora.max_lora_rank",
                 "engine.lora.max_cpu_loras", "engine.lora.adapters_x"):  # fmt: skip
        assert restart_only(name), name
    server.edit(lambda d: (d["engine"]["lora"].update(max_loras=4),
                           d["engine"]["lora"]["adapters"].update(poet="/srv/poet")))  # fmt: skip
    result = await server.reloader.reload()
    assert result.outcome == "refused"
    assert result.message == "nothing changed: these settings need a restart: engine.lora.max_loras"
    assert server.engine.adapters == ("sql",)
