"""The admission queue on the HTTP path: queued heartbeats, 503s, deadlines, overload."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp

from llmserve.admission import AdmissionQueue
from llmserve.engine.fake import FakeEngine
from tests.support.api import chat_body, make_config, parse_sse
from tests.support.process import llmserve_up


async def test_a_waiting_stream_hears_its_queue_position(app_client, tmp_path):
    config = make_config(tmp_path, server={"heartbeat_seconds": 0.05})
    engine = FakeEngine("fake", 256, tokens_per_second=20)
    queue = AdmissionQueue(1, 4, 30)
    client = await app_client(config, engine, admission=queue)
    first = asyncio.ensure_future(
        client.post("/v1/chat/completions", json=chat_body(max_tokens=6, stream=True))
    )
    while engine.running == 0:
        await asyncio.sleep(0.01)
    second = await client.post("/v1/chat/completions", json=chat_body(max_tokens=1, stream=True))
    events = parse_sse(await second.read())
    assert events[0] == b": queued position=1"
    assert events[-1] == b"data: [DONE]"
    assert second.headers.get("X-Queue-Wait-Ms") is None  # headers left before the wait ended
    assert (await first).status == 200
    assert engine.max_running == 1


async def test_full_queue_is_503_with_retry_after(app_client, config):
    engine = FakeEngine("fake", 256, tokens_per_second=10)
    queue = AdmissionQueue(1, 0, 30)
    client = await app_client(config, engine, admission=queue)
    running = asyncio.ensure_future(
        client.post("/v1/chat/completions", json=chat_body(max_tokens=5))
    )
    while engine.running == 0:
        await asyncio.sleep(0.01)
    resp = await client.post("/v1/chat/completions", json=chat_body(max_tokens=1, stream=True))
    assert resp.status == 503
    assert int(resp.headers["Retry-After"]) >= 1
    assert (await resp.json())["error"]["code"] == "server_overloaded"
    assert (await running).status == 200


async def test_client_deadline_aborts_a_running_request(app_client, config):
    engine = FakeEngine("fake", 256, tokens_per_second=20)
    client = await app_client(config, engine)
    started = time.monotonic()
    resp = await client.post("/v1/chat/completions", json=chat_body(max_tokens=100),
                             headers={"X-Request-Timeout": "0.3"})  # fmt: skip
    assert resp.status == 504
    assert (await resp.json())["error"]["code"] == "deadline_exceeded"
    assert time.monotonic() - started < 3
    assert list(engine.aborted) == [engine.calls[0].request_id]
    assert engine.running == 0


async def test_client_deadline_mid_stream_is_an_error_event(app_client, config):
    engine = FakeEngine("fake", 256, tokens_per_second=20)
    client = await app_client(config, engine)
    resp = await client.post("/v1/chat/completions", json=chat_body(max_tokens=100, stream=True),
                             headers={"X-Request-Timeout": "0.3"})  # fmt: skip
    events = parse_sse(await resp.read())
    assert json.loads(events[-1][6:])["error"]["code"] == "deadline_exceeded"
    assert engine.aborted


async def test_bad_request_timeout_header_is_400(client):
    resp = await client.post("/v1/chat/completions", json=chat_body(),
                             headers={"X-Request-Timeout": "soon"})  # fmt: skip
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "X-Request-Timeout"


async def test_disconnect_while_queued_frees_the_place(app_client, config):
    engine = FakeEngine("fake", 256, tokens_per_second=10)
    queue = AdmissionQueue(1, 1, 30)
    client = await app_client(config, engine, admission=queue)
    running = asyncio.ensure_future(
        client.post("/v1/chat/completions", json=chat_body(max_tokens=5))
    )
    while engine.running == 0:
        await asyncio.sleep(0.01)
    waiting = asyncio.ensure_future(
        client.post("/v1/chat/completions", json=chat_body(max_tokens=1))
    )
    while queue.depth == 0:
        await asyncio.sleep(0.01)
    waiting.cancel()
    while queue.depth:
        await asyncio.sleep(0.01)
    assert queue.depth == 0
    assert (await running).status == 200
    assert len(engine.calls) == 1  # the cancelled request never reached the engine


async def test_overload_500_streams_all_end_cleanly(app_client, config):
    engine = FakeEngine("fake", 256, tokens_per_second=200)
    queue = AdmissionQueue(8, 32, 30)
    client = await app_client(config, engine, admission=queue)

    async def one() -> str:
        resp = await client.post("/v1/chat/completions",
                                 json=chat_body(max_tokens=10, stream=True))  # fmt: skip
        if resp.status == 503:
            assert int(resp.headers["Retry-After"]) >= 1
            return (await resp.json())["error"]["code"]
        events = parse_sse(await resp.read())
        assert events[-1] == b"data: [DONE]"
        return "complete"

    async with asyncio.timeout(60):
        outcomes = await asyncio.gather(*(one() for _ in range(500)))
    assert set(outcomes) <= {"complete", "server_overloaded"}
    assert outcomes.count("complete") >= 40  # 8 running + 32 waiting at least
    assert engine.max_running <= 8
    assert queue.depth == 0 and queue.in_flight == 0


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_overload_of_a_real_server_keeps_memory_bounded(tmp_path):
    config = {
        "engine": {"kind": "fake", "served_model_name": "fake", "max_model_len": 512,
                   "max_num_seqs": 8, "fake": {"tokens_per_second": 200}},
        "queue": {"max_concurrency": 8, "max_depth": 32},
        "auth": {"enabled": False, "keys": str(tmp_path / "keys")},
        "limits": {"state_dir": str(tmp_path / "limits")},
        "usage": {"ledger": str(tmp_path / "usage.jsonl")},
        "logging": {"access_log": False},
    }  # fmt: skip

    async def round_of_500(url: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def one() -> None:
                async with session.post(url, json=chat_body(max_tokens=10, stream=True)) as r:
                    body = await r.read()
                    ok = r.status == 200 and body.endswith(b"data: [DONE]\n\n")
                    kind = "complete" if ok else f"{r.status}:{'Retry-After' in r.headers}"
                    counts[kind] = counts.get(kind, 0) + 1

            async with asyncio.timeout(120):
                await asyncio.gather(*(one() for _ in range(500)))
        return counts

    with llmserve_up(tmp_path, config, ready_path="/ready") as server:
        url = server.base_url + "/v1/chat/completions"
        first = asyncio.run(round_of_500(url))
        rss_after_first = _rss_kib(server.proc.pid)
        second = asyncio.run(round_of_500(url))
        rss_after_second = _rss_kib(server.proc.pid)
    for counts in (first, second):
        assert sum(counts.values()) == 500
        assert set(counts) <= {"complete", "503:True"}, counts
    assert rss_after_second - rss_after_first < 20 * 1024, (rss_after_first, rss_after_second)


async def test_json_responses_carry_the_queue_wait(app_client, config):
    client = await app_client(config, FakeEngine("fake", 256), admission=AdmissionQueue(1, 1, 30))
    resp = await client.post("/v1/chat/completions", json=chat_body(max_tokens=1))
    assert resp.status == 200
    assert int(resp.headers["X-Queue-Wait-Ms"]) >= 0


async def test_a_request_refused_for_its_ttft_objective_is_answered_at_once_and_never_charged(
    app_client, tmp_path
):
    from llmserve.limits import Limiter, store_from_url

    config = make_config(
        tmp_path,
        queue={"ttft_slo_seconds": 0.05},  # below any wait plus the prefill prior
        limits={"state_dir": str(tmp_path / "limits"), "default_tier": "t",
                "tiers": {"t": {"requests_per_minute": 100, "tokens_per_day": 100_000}}},
    )  # fmt: skip
    engine = FakeEngine("fake", 256, tokens_per_second=10)
    limiter = Limiter(config.limits, store_from_url("memory://"))
    client = await app_client(config, engine, admission=AdmissionQueue(1, 8, 30),
                              limiter=limiter)  # fmt: skip
    # one request finishes first: the queue has seen how fast its slot frees up (before any
    # completion it refuses no one on a guess)
    assert (await client.post("/v1/chat/completions", json=chat_body(max_tokens=1))).status == 200
    running = asyncio.ensure_future(
        client.post("/v1/chat/completions", json=chat_body(max_tokens=10))
    )
    while engine.running == 0:
        await asyncio.sleep(0.01)
    before = {w.name: w.used for w in await limiter.usage("anonymous", "t", {})}
    started = time.monotonic()
    refused = await client.post("/v1/chat/completions", json=chat_body(max_tokens=5))
    took = time.monotonic() - started
    assert refused.status == 503
    body = await refused.json()
    assert body["error"]["code"] == "server_overloaded"
    assert "time to first token" in body["error"]["message"]
    assert int(refused.headers["Retry-After"]) >= 1
    assert took < 0.5  # at once, not after waiting
    after = {w.name: w.used for w in await limiter.usage("anonymous", "t", {})}
    assert after == before  # not a token, not a request
    assert len(engine.calls) == 2  # it never reached the engine
    assert (await running).status == 200
