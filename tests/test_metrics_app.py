"""Requests through the real app (fake engine) land in the metrics, and `top` reads them."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry

from llmserve.config import MetricsConfig
from llmserve.engine.fake import FakeEngine
from llmserve.metrics import Metrics
from tests.support.api import make_config

ROOT = Path(__file__).parent.parent
CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 4}


def fresh_metrics() -> tuple[Metrics, CollectorRegistry]:
    registry = CollectorRegistry()
    return Metrics(registry, MetricsConfig(), include_default_registry=False), registry


async def test_success_and_500_through_the_app_are_counted(app_client, tmp_path: Path) -> None:
    config = make_config(tmp_path, server={"public_metrics": True})
    metrics, registry = fresh_metrics()
    engine = FakeEngine(model_name="fake", max_model_len=256)
    client = await app_client(config, engine, metrics=metrics)
    assert (await client.post("/v1/chat/completions", json=CHAT)).status == 200
    engine.fail_before_first_token = True
    assert (await client.post("/v1/chat/completions", json=CHAT)).status == 500
    value = registry.get_sample_value
    assert value("llmserve_requests_total", {"route": "chat", "status": "200", "code": ""}) == 1
    failed = {"route": "chat", "status": "500", "code": "engine_error"}
    assert value("llmserve_requests_total", failed) == 1
    assert value("llmserve_tokens_total", {"type": "completion", "tier": "default"}) == 4
    assert value("llmserve_time_to_first_token_seconds_count") == 1
    response = await client.get("/metrics")
    assert response.status == 200
    text = await response.text()
    assert 'llmserve_requests_total{route="chat",status="500",code="engine_error"} 1.0' in text


async def test_top_once_reads_a_live_app(app_client, tmp_path: Path) -> None:
    config = make_config(tmp_path, server={"public_metrics": True})
    metrics, _ = fresh_metrics()
    engine = FakeEngine(model_name="fake")
    client = await app_client(config, engine, metrics=metrics)
    for _ in range(3):
        assert (await client.post("/v1/chat/completions", json=CHAT)).status == 200
    engine.fail_before_first_token = True
    for _ in range(2):
        assert (await client.post("/v1/chat/completions", json=CHAT)).status == 500
    url = str(client.make_url("/")).rstrip("/")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmserve", "top", url, "--once", "--interval", "0.5",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    text = out.decode()
    assert proc.returncode == 0, err.decode() + text
    assert "health ok" in text
    row = next(line for line in text.splitlines() if "5xx errors" in line)
    assert row.split()[-2:] == ["0", "2"]  # none in the window, 2 since the start


async def test_in_flight_gauge_counts_requests_holding_an_engine_slot(aiohttp_client, tmp_path):
    from llmserve.server.app import ENGINE_START
    from llmserve.server.components import build_components

    config = make_config(tmp_path, server={"public_metrics": True},
                         engine={"fake": {"tokens_per_second": 20}})  # fmt: skip
    client = await aiohttp_client(build_components(config).app)
    await client.app[ENGINE_START]

    async def gauges() -> dict[str, str]:
        text = await (await client.get("/metrics")).text()
        return {line.split()[0]: line.split()[1] for line in text.splitlines()
                if line.startswith(("llmserve_in_flight_requests ",
                                    "llmserve_concurrency_limit "))}  # fmt: skip

    idle = await gauges()
    assert idle["llmserve_in_flight_requests"] == "0.0"  # the scrape itself holds no slot
    body = {**CHAT, "max_tokens": 40}
    running = [asyncio.ensure_future(client.post("/v1/chat/completions", json=body))
               for _ in range(3)]  # fmt: skip
    await asyncio.sleep(0.5)
    busy = await gauges()
    assert busy["llmserve_in_flight_requests"] == "3.0"
    for response in await asyncio.gather(*running):
        assert response.status == 200


async def test_data_parallel_engines_double_the_slots_and_report_each_rank(
    aiohttp_client, tmp_path
) -> None:
    from llmserve.server.app import ENGINE_START
    from llmserve.server.components import build_components

    config = make_config(tmp_path, server={"public_metrics": True},
                         engine={"max_num_seqs": 2, "data_parallel_size": 2,
                                 "fake": {"tokens_per_second": 20}})  # fmt: skip
    assert config.max_concurrency == 4  # max_num_seqs per engine, two engines
    client = await aiohttp_client(build_components(config).app)
    await client.app[ENGINE_START]
    body = {**CHAT, "max_tokens": 40}
    running = [asyncio.ensure_future(client.post("/v1/chat/completions", json=body))
               for _ in range(5)]  # fmt: skip
    await asyncio.sleep(0.5)
    text = await (await client.get("/metrics")).text()
    samples = {line.rsplit(" ", 1)[0]: line.rsplit(" ", 1)[1] for line in text.splitlines()
               if line.startswith("llmserve_") and not line.startswith("#")}  # fmt: skip
    assert samples["llmserve_concurrency_limit"] == "4.0"
    assert samples["llmserve_in_flight_requests"] == "4.0"
    assert samples["llmserve_queue_depth"] == "1.0"  # the fifth waits for a slot
    assert samples['llmserve_engine_rank_running_requests{rank="0"}'] == "2.0"
    assert samples['llmserve_engine_rank_running_requests{rank="1"}'] == "2.0"
    assert samples['llmserve_engine_rank_kv_cache_usage_ratio{rank="1"}'] == "1.0"
    for response in await asyncio.gather(*running):
        assert response.status == 200
