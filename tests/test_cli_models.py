"""`llmserve models load NAME PATH` and `llmserve models unload NAME` against a running
`llmserve up` (fake engine, API keys on): through the admin listener named in the config file,
or the API port with an admin key, as `llmserve reload`; exit 0 done, 1 refused, 2 unreachable.
The routes themselves: tests/test_api_adapters.py."""

from __future__ import annotations

from pathlib import Path

import httpx
from typer.testing import CliRunner

from llmserve.auth.keys import KeyStore
from llmserve.cli.main import app
from tests.support.process import free_port, llmserve_up

runner = CliRunner()


def _models(base_url: str, key: str) -> list[str]:
    reply = httpx.get(base_url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
    return [m["id"] for m in reply.json()["data"]]


def test_models_load_and_unload_reach_the_running_server(tmp_path: Path, monkeypatch) -> None:
    store = KeyStore(tmp_path / "keys")
    _, admin = store.create("ops", admin=True)
    _, user = store.create("user")
    config = {
        "engine": {"kind": "fake", "served_model_name": "fake", "max_model_len": 256},
        "auth": {"keys": str(tmp_path / "keys")},
        "server": {"admin_port": free_port()},
        "limits": {"state_dir": str(tmp_path / "limits")},
        "usage": {"ledger": None},
    }
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LLMSERVE_API_KEY", raising=False)
    with llmserve_up(tmp_path, config) as server:
        cli = ["-c", str(server.log_path.with_suffix(".yaml"))]
        loaded = runner.invoke(app, ["models", "load", "poet", "./adapters/poet", *cli])
        assert loaded.exit_code == 0, loaded.output
        # a local path as the shell that ran the command sees it
        assert loaded.stdout == f"serving adapter 'poet' from {tmp_path}/adapters/poet\n"
        assert _models(server.base_url, user) == ["fake", "poet"]

        again = runner.invoke(app, ["models", "load", "poet", "/srv/poet", *cli])
        assert again.exit_code == 1
        assert again.stderr.startswith("error: The name 'poet' is taken: it is an adapter")

        unloaded = runner.invoke(app, ["models", "unload", "poet", *cli])
        assert (unloaded.exit_code, unloaded.stdout) == (0, "adapter 'poet' unloaded\n")
        assert _models(server.base_url, user) == ["fake"]
        unknown = runner.invoke(app, ["models", "unload", "poet", *cli])
        assert unknown.exit_code == 1 and "No adapter 'poet' is loaded" in unknown.stderr

        # the API port: an admin key is needed
        api = ["--url", server.base_url]
        without = runner.invoke(app, ["models", "load", "sql", "/srv/sql", *api])
        assert without.exit_code == 1 and without.stderr.startswith("error: ")
        as_user = runner.invoke(app, ["models", "load", "sql", "/srv/sql", *api, "--api-key", user])
        assert as_user.exit_code == 1 and "admin" in as_user.stderr
        as_admin = runner.invoke(app, ["models", "load", "sql", "/srv/sql", *api],
                                 env={"LLMSERVE_API_KEY": admin})  # fmt: skip
        assert as_admin.exit_code == 0, as_admin.output
        assert _models(server.base_url, user) == ["fake", "sql"]

    gone = runner.invoke(
        app, ["models", "unload", "sql", "--url", f"http://127.0.0.1:{free_port()}"]
    )
    assert gone.exit_code == 2 and "cannot reach the server" in gone.stderr
