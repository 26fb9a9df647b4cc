"""Cost of each piece of the request path, in process, one call at a time.

taskset -c 0 .venv/bin/python benchmarks/gateway_pieces.py
"""

import asyncio
import json
import tempfile
import time
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry

from llmserve.admission import AdmissionQueue
from llmserve.api.body import JSONLimits, parse_json_object
from llmserve.api.schemas import ChatCompletionRequest, parse_request
from llmserve.config import Config
from llmserve.engine.fake import FakeEngine
from llmserve.limits import Limiter, store_from_url
from llmserve.metrics import Metrics
from llmserve.records import RequestRecord
from llmserve.usage import UsageLedger

body = json.dumps(
    {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
).encode()
N = 20000


def t(name, f):
    s = time.perf_counter()
    for _ in range(N):
        f()
    print(f"{name:<28} {(time.perf_counter() - s) / N * 1e6:7.2f} us")


async def ta(name, f):
    s = time.perf_counter()
    for _ in range(N):
        await f()
    print(f"{name:<28} {(time.perf_counter() - s) / N * 1e6:7.2f} us")


async def main():
    tmp = Path(tempfile.mkdtemp())
    cfg = Config.model_validate(
        {
            "limits": {
                "state_dir": str(tmp / "l"),
                "default_tier": "b",
                "tiers": {"b": {"requests_per_minute": 10**9, "tokens_per_minute": 10**12}},
            }
        }
    )
    limits = JSONLimits()
    t("parse_json_object", lambda: parse_json_object(body, limits))
    t(
        "parse + parse_request",
        lambda: parse_request(ChatCompletionRequest, parse_json_object(body, limits)),
    )
    eng = FakeEngine("fake", 4096)
    await eng.start()
    req = parse_request(ChatCompletionRequest, parse_json_object(body, limits))
    await ta("render_chat", lambda: eng.render_chat(req.messages))
    lim = Limiter(cfg.limits, store_from_url("memory://", tmp / "l"))

    async def rs():
        r = await lim.reserve("p", "b", {}, 4, 8)
        await lim.settle(r, 4, 8)

    await ta("limiter reserve+settle", rs)
    q = AdmissionQueue(100, 100, 30)

    async def adm():
        tk = q.enqueue(0, 12, None)
        await tk.wait()
        tk.release()

    await ta("admission enqueue/wait/rel", adm)
    m = Metrics(CollectorRegistry(), cfg.metrics, include_default_registry=False)
    rec = RequestRecord(
        request_id="r",
        route="chat",
        started_at=time.time(),
        principal_id="p",
        tier="b",
        model="fake",
        status=200,
        prompt_tokens=4,
        completion_tokens=8,
        ttft_seconds=0.01,
        total_seconds=0.02,
        queue_wait_seconds=0.0,
        inter_token_seconds=[0.001] * 7,
    )
    t("metrics.observe", lambda: m.observe(rec))
    led = UsageLedger(tmp / "u.jsonl", 1 << 30, 1)
    t("ledger.append", lambda: led.append(rec))
    led.close()
    t(
        "json_response",
        lambda: web.json_response(
            {
                "id": "x",
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "The quick brown fox"}}
                ],
                "usage": {"a": 1},
            }
        ),
    )

    async def gen():
        from llmserve.engine.base import SamplingOptions

        p = await eng.render_chat(req.messages)
        async for _delta in eng.generate(p, SamplingOptions(max_tokens=8), "r"):
            pass

    await ta("fake generate 8 tokens", gen)


asyncio.run(main())
