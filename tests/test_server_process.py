"""A real `llmserve up` process: the official openai client, and graceful shutdown on SIGTERM."""

from __future__ import annotations

import signal
import time

import httpx
import openai
import pytest

from tests.support.process import llmserve_up


def fake_config(tmp_path, **fake):
    return {
        "engine": {"kind": "fake", "served_model_name": "fake", "max_model_len": 512,
                   "fake": fake},
        "auth": {"enabled": False, "keys": str(tmp_path / "keys")},
        "limits": {"state_dir": str(tmp_path / "limits")},
        "usage": {"ledger": str(tmp_path / "usage.jsonl")},
        "server": {"shutdown_grace_seconds": 10},
    }  # fmt: skip


@pytest.fixture
def server(tmp_path):
    with llmserve_up(tmp_path, fake_config(tmp_path), ready_path="/ready") as proc:
        yield proc


def test_openai_client_against_a_real_server(server):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert chat.choices[0].message.content == "The quick brown "
    assert chat.usage.completion_tokens == 3

    stream = client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The quick brown fox "
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 4

    completion = client.completions.create(model="fake", prompt="one two", max_tokens=2)
    assert completion.choices[0].text == "The quick "
    assert [m.id for m in client.models.list()] == ["fake"]

    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="fake", messages=[{"role": "user", "content": "x"}], n=2
        )
    assert info.value.param == "n"


def _stream_lines(response):
    return [line for line in response.iter_lines() if line]


def test_sigterm_lets_an_inflight_stream_finish_and_exits_0(tmp_path):
    config = fake_config(tmp_path, tokens_per_second=20)
    with llmserve_up(tmp_path, config, ready_path="/ready") as server:
        body = {"model": "fake", "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 30, "stream": True}  # fmt: skip
        with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body,
                          timeout=30) as response:  # fmt: skip
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            started = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"  # the stream finished normally during the drain
        assert server.proc.wait(15) == 0
        assert time.monotonic() - started < 10  # within the grace time
        assert "signal received: draining" in server.log()


def test_sigterm_past_the_grace_time_ends_streams_with_an_error_event(tmp_path):
    config = fake_config(tmp_path, tokens_per_second=5)
    config["server"]["shutdown_grace_seconds"] = 0.5
    with llmserve_up(tmp_path, config, ready_path="/ready") as server:
        body = {"model": "fake", "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 200, "stream": True}  # fmt: skip
        with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body,
                          timeout=30) as response:  # fmt: skip
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            server.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert '"code": "shutting_down"' in rest[-1].replace('":"', '": "')
        assert "[DONE]" not in rest
        assert server.proc.wait(15) == 0
