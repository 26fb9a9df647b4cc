"""`llmserve bench` against a small OpenAI-style SSE server written here (not llmserve's)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from llmserve.bench.client import Target
from llmserve.bench.datasets import random_requests
from llmserve.bench.records import RATE_LIMIT_HEADERS
from llmserve.bench.runner import run_load

REPO = Path(__file__).resolve().parents[1]
STARTED = web.AppKey("started", list)
FINISHED = web.AppKey("finished", list)
HOLD_AFTER = web.AppKey("hold_after", list)  # [n]: requests beyond n never finish
PROGRESS = web.AppKey("progress", asyncio.Event)


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None):
    body = {"error": {"message": message, "type": "x", "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


async def completions(request: web.Request) -> web.StreamResponse:
    """Keys script the outcome: bad -> 401, limited -> 429, cut -> stream drops, else tokens."""
    key = request.headers.get("Authorization", "").removeprefix("Bearer ")
    body = await request.json()
    if key == "bad":
        return _error(401, "invalid_api_key", "Invalid API key.")
    if key == "limited":
        headers = {"Retry-After": "7", **{h: "1" for h in RATE_LIMIT_HEADERS}}
        return _error(429, "rate_limit_exceeded", "requests per minute limit reached", headers)
    request.app[STARTED].append(body)
    request.app[PROGRESS].set()
    if len(request.app[STARTED]) > request.app[HOLD_AFTER][0]:
        await asyncio.Event().wait()  # held until the client goes away
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    response.headers["X-Queue-Wait-Ms"] = "4"
    await response.prepare(request)
    tokens = body.get("max_tokens") or body.get("max_completion_tokens")
    for i in range(tokens):
        await response.write(f"data: {json.dumps({'choices': [{'text': f't{i} '}]})}\n\n".encode())
        if key == "cut":
            request.transport.close()
            return response
        await asyncio.sleep(0)
    text = body["prompt"] if "prompt" in body else body["messages"][0]["content"]
    prompt_tokens = len(text.split())
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": tokens}
    await response.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    request.app[FINISHED].append(body)
    request.app[PROGRESS].set()
    return response


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": "tiny", "object": "model"}]})


@pytest.fixture
async def server(aiohttp_server) -> AsyncIterator[TestServer]:
    app = web.Application()
    app[STARTED], app[FINISHED], app[HOLD_AFTER] = [], [], [10**9]
    app[PROGRESS] = asyncio.Event()
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/v1/models", models)
    yield await aiohttp_server(app)


def base(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


async def test_keys_spread_load_and_outcomes_are_recorded(server: TestServer) -> None:
    keys = ("good", "limited", "bad", "cut")
    target = Target(base_url=base(server), model="tiny", api_keys=keys)
    samples = random_requests(8, 6, 3, seed=0)
    outcome = await run_load(target, samples, [0.0] * 8, max_concurrency=3)
    by_key = {keys[r.api_key_index or 0]: r for r in outcome.results}
    assert [r.index for r in outcome.results] == list(range(8))
    assert by_key["good"].success and by_key["good"].output_tokens == 3
    assert by_key["good"].prompt_len == 6 and len(by_key["good"].itl) == 2
    assert by_key["good"].headers["x-queue-wait-ms"] == "4"
    assert (by_key["limited"].status, by_key["limited"].headers["retry-after"]) == (429, "7")
    assert (by_key["bad"].status, by_key["bad"].error_code) == (401, "invalid_api_key")
    assert (by_key["cut"].status, by_key["cut"].error_code) == (200, "stream_truncated")
    assert not outcome.interrupted and outcome.duration > 0


def _bench_command(*args: str) -> list[str]:
    # Only the bench command: the other CLI modules are not needed to run it.
    script = (
        "import typer; from llmserve.cli import bench\n"
        "app = typer.Typer(add_completion=False)\n"
        "app.callback()(lambda: None)\n"
        "bench.register(app)\n"
        "app()\n"
    )
    return [sys.executable, "-c", script, "bench", *args]


async def _start(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *_bench_command(*args),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # its own process group, killed whole if the test fails
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "120"},
    )


def _kill(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        os.killpg(process.pid, signal.SIGKILL)


async def test_cli_prints_vllm_block_and_saves_result_json(
    server: TestServer, tmp_path: Path
) -> None:
    process = await _start(
        "--base-url", base(server), "--endpoint", "/v1/chat/completions",
        "--num-prompts", "5", "--random-input-len", "8", "--random-output-len", "4",
        "--request-rate", "500", "--max-concurrency", "2",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--goodput", "ttft:60000", "--goodput", "tpot:60000",
        "--save-result", "--result-dir", str(tmp_path), "--disable-tqdm",
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(process.communicate(), 60)
    finally:
        _kill(process)
    text = out.decode()
    assert process.returncode == 0, err.decode()
    assert "============ Serving Benchmark Result ============" in text
    assert "Request goodput (req/s):" in text and "P50 E2EL (ms):" in text
    (path,) = tmp_path.glob("openai-chat-500.0qps-concurrency2-tiny-*.json")
    result = json.loads(path.read_text())
    assert (result["completed"], result["failed"], result["model_id"]) == (5, 0, "tiny")
    assert result["total_output_tokens"] == 20 and result["total_input_tokens"] == 5 * 8
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])
    assert result["llmserve"]["status_counts"] == {"200": 5}
    assert result["llmserve"]["server_queue_wait_ms"]["median"] == 4.0
    assert "p99_client_queue_time_ms" not in result  # not selected, as in vLLM
    assert "max_completion_tokens" in server.app[FINISHED][0]


async def test_ctrl_c_stops_early_and_reports_what_completed(server: TestServer) -> None:
    server.app[HOLD_AFTER][0] = 2  # two requests finish, the rest hang until the client leaves
    process = await _start(
        "--base-url", base(server), "--model", "tiny", "--num-prompts", "6",
        "--input-len", "4", "--output-len", "2", "--disable-tqdm",
    )  # fmt: skip
    try:
        while len(server.app[FINISHED]) < 2 or len(server.app[STARTED]) < 6:
            server.app[PROGRESS].clear()
            await asyncio.wait_for(server.app[PROGRESS].wait(), 30)
        process.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(process.communicate(), 30)
    finally:
        _kill(process)
    text = out.decode()
    assert process.returncode == 0, err.decode()
    assert "Successful requests:".ljust(40) + " 2 " in text
    assert "Interrupted: only the requests that completed are counted." in text


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("--goodput", "itl:5"), 2, "goodput"),
        (("--dataset-name", "sharegpt"), 2, "--dataset-path"),
        ((), 1, "no request succeeded"),
    ],
)
async def test_cli_exit_codes(args: tuple[str, ...], code: int, message: str) -> None:
    process = await _start(
        "--base-url", "http://127.0.0.1:9", "--model", "m", "--num-prompts", "2",
        "--input-len", "2", "--output-len", "2", "--disable-tqdm", *args,
    )  # fmt: skip
    try:
        _, err = await asyncio.wait_for(process.communicate(), 30)
    finally:
        _kill(process)
    assert process.returncode == code
    assert message in err.decode()
