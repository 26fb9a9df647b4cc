"""`llmserve up` with the real engine: the default config (SmolLM2, auth on) answering the
official openai client, and a dead engine making the server drain and exit 1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.engine.conftest import SMOLLM2_DIR
from tests.support.process import group_members, kill_group, llmserve_up

pytestmark = pytest.mark.engine
ROOT = Path(__file__).resolve().parents[2]


def default_config_relocated(tmp_path: Path) -> dict:
    """The repository's llmserve.yaml as shipped, with its relative paths moved to tmp_path."""
    config = yaml.safe_load((ROOT / "llmserve.yaml").read_text())
    config["engine"]["model"] = str(SMOLLM2_DIR)
    config["auth"]["keys"] = str(tmp_path / "keys")
    config.setdefault("limits", {})["state_dir"] = str(tmp_path / "limits")
    config["usage"] = {"ledger": str(tmp_path / "usage.jsonl")}
    return config


@pytest.mark.smollm2
@pytest.mark.skipif(not (SMOLLM2_DIR / "config.json").is_file(),
                    reason="run `llmserve models prepare` first")  # fmt: skip
def test_default_config_serves_smollm2_to_the_openai_client(tmp_path):
    from openai import OpenAI

    with llmserve_up(tmp_path, default_config_relocated(tmp_path), timeout=300) as server:
        config_path = next(tmp_path.glob("llmserve-*.yaml"))

        def create_key(*extra: str) -> str:
            created = subprocess.run(
                [sys.executable, "-m", "llmserve", "keys", "create", "--name", "t", "--tier",
                 "free", "-c", str(config_path), *extra],
                capture_output=True, text=True, check=True, timeout=60,
            )  # fmt: skip
            return next(w for w in created.stdout.split() if w.startswith("sk-llms-"))

        key, admin = create_key(), create_key("--admin")
        deadline = time.monotonic() + 300
        ready = server.base_url + "/ready"
        while httpx.get(ready, headers={"X-API-Key": admin}).status_code != 200:
            assert time.monotonic() < deadline and server.proc.poll() is None, server.log()[-2000:]
            time.sleep(0.5)
        client = OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0)
        stream = client.chat.completions.create(
            model="smollm2", stream=True, max_tokens=24, temperature=0,
            messages=[{"role": "user",
                       "content": "What is the capital of France? Answer in one sentence."}],
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert "Paris" in text
        assert chunks[-1].usage.completion_tokens >= 1
        # the free tier's limits are on: the answer carries OpenAI's rate-limit headers
        raw = client.chat.completions.with_raw_response.create(
            model="smollm2", max_tokens=2, messages=[{"role": "user", "content": "Hi"}]
        )
        assert raw.headers["x-ratelimit-limit-requests"] == "20"


def engine_core_pids(pgid: int) -> list[int]:
    pids = []
    for pid in group_members(pgid):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if "EngineCore" in name or b"EngineCore" in cmdline:
            pids.append(pid)
    return pids


def test_a_dead_engine_ends_streams_with_an_error_and_exits_1(tmp_path, tiny_model_dir):
    config = {
        "server": {"public_ready": True, "shutdown_grace_seconds": 5},
        "engine": {"model": str(tiny_model_dir), "served_model_name": "tiny",
                   "max_model_len": 512, "cpu_kv_cache_bytes": "256MiB"},
        "auth": {"enabled": False},
        "limits": {"state_dir": str(tmp_path / "limits")},
        "usage": {"ledger": None},
    }  # fmt: skip
    with llmserve_up(tmp_path, config, ready_path="/ready", timeout=300) as server:
        pgid = server.proc.pid
        [core] = engine_core_pids(pgid)
        body = {"model": "tiny", "max_tokens": 480, "stream": True,
                "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
        with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body,
                          timeout=60) as response:  # fmt: skip
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            os.kill(core, signal.SIGKILL)
            rest = [line for line in lines if line]
        assert rest and '"error"' in rest[-1], rest[-3:]
        assert server.proc.wait(60) == 1
        log = server.log()
        assert "the engine died" in log or "engine" in log.lower()
    deadline = time.monotonic() + 10
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = group_members(pgid)
    kill_group(server.proc)
    assert not left


def test_no_engine_process_outlives_a_sigkilled_server(tmp_path, tiny_model_dir):
    config = {
        "server": {"public_ready": True},
        "engine": {"model": str(tiny_model_dir), "served_model_name": "tiny",
                   "max_model_len": 512, "cpu_kv_cache_bytes": "256MiB"},
        "auth": {"enabled": False},
        "limits": {"state_dir": str(tmp_path / "limits")},
        "usage": {"ledger": None},
    }  # fmt: skip
    with llmserve_up(tmp_path, config, ready_path="/ready", timeout=300) as server:
        [core] = engine_core_pids(server.proc.pid)
        body = {"model": "tiny", "max_tokens": 480, "stream": True,
                "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
        with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body,
                          timeout=60) as response:  # fmt: skip
            assert next(response.iter_lines()).startswith("data: ")
            os.kill(server.proc.pid, signal.SIGKILL)  # the server only, mid-stream
            server.proc.wait(10)
            deadline = time.monotonic() + 5
            while Path(f"/proc/{core}").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            status = Path(f"/proc/{core}/stat")
            left = status.exists() and status.read_text().rsplit(")", 1)[1].split()[0] != "Z"
            assert not left, "the engine core outlived the server by 5 s"
