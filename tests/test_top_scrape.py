from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
from aiohttp import web

from llmserve.top.loop import TopState, snapshot_once
from llmserve.top.scrape import Scrape, ScrapeError, Scraper, parse_metrics

DATA = Path(__file__).parent / "data"


def test_parser_reads_labels_values_and_skips_other_exporters() -> None:
    text = (
        "# HELP llmserve_x_total doc\n"
        "# TYPE llmserve_x_total counter\n"
        'llmserve_x_total{principal="a \\"quoted\\", b",type="prompt"} 12.0\n'
        "llmserve_start_time_seconds 1.7e+09\n"
        'llmserve_h_bucket{le="+Inf"} 3.0\n'
        'vllm:num_requests_running{engine="0"} 4.0\n'
        "process_cpu_seconds_total 1.0\n"
        "llmserve_garbage{ 1\n"
    )
    samples = parse_metrics(text)
    assert samples["llmserve_x_total"] == [({"principal": 'a "quoted", b', "type": "prompt"}, 12.0)]
    assert samples["llmserve_start_time_seconds"] == [({}, 1.7e9)]
    assert samples["llmserve_h_bucket"] == [({"le": "+Inf"}, 3.0)]
    assert set(samples) == {"llmserve_x_total", "llmserve_start_time_seconds", "llmserve_h_bucket"}


def test_recorded_scrape_parses_histogram_buckets_in_order() -> None:
    scrape = Scrape(0, 0, parse_metrics((DATA / "top_scrape_2.txt").read_text()))
    buckets = scrape.buckets("llmserve_time_to_first_token_seconds")
    assert buckets[0] == (0.01, 0.0)
    assert buckets[-1][0] == math.inf and buckets[-1][1] == 174.0
    assert scrape.total("llmserve_requests_total", route="chat", status="200") == 170.0


class FakeScraper:
    url = "http://fake"

    def __init__(self, results: list[Scrape | ScrapeError]) -> None:
        self.results = results

    def scrape(self) -> Scrape:
        result = self.results.pop(0)
        if isinstance(result, ScrapeError):
            raise result
        return result


def recorded(n: int, at: float) -> Scrape:
    return Scrape(at, 0.0, parse_metrics((DATA / f"top_scrape_{n}.txt").read_text()), True)


def test_state_survives_a_failed_scrape_and_resumes_rates_against_the_last_good_one() -> None:
    state = TopState(FakeScraper([recorded(1, 0.0), ScrapeError("refused"), recorded(2, 4.0)]), 1)  # type: ignore[arg-type]
    state.step()
    state.step()
    assert state.view().error == "refused"
    state.step()
    view = state.view()
    assert view.error is None and view.snapshot is not None
    assert view.snapshot.requests_per_second == 8.0  # 32 requests over the 4 s since scrape 1


def test_keys_quit_pause_and_change_the_interval() -> None:
    state = TopState(FakeScraper([]), 1.0)  # type: ignore[arg-type]
    assert state.handle_key(" ") and state.paused
    assert state.handle_key(" ") and not state.paused
    assert state.handle_key("+") and state.interval == 2.0
    assert state.handle_key("-") and state.handle_key("-") and state.interval == 0.5
    for _ in range(5):
        state.handle_key("-")
    assert state.interval == 0.25
    assert state.handle_key("x")
    assert not state.handle_key("q")


def test_snapshot_once_takes_two_scrapes_an_interval_apart() -> None:
    slept: list[float] = []
    fake = FakeScraper([recorded(1, 0.0), recorded(2, 2.0)])
    _, ok = snapshot_once(fake, 2.0, sleep=slept.append)  # type: ignore[arg-type]
    assert ok and slept == [2.0] and fake.results == []


def test_snapshot_once_reports_an_unreachable_server() -> None:
    fake = FakeScraper([ScrapeError("http://x: refused")])
    _, ok = snapshot_once(fake, 1.0, sleep=lambda s: None)  # type: ignore[arg-type]
    assert not ok


async def test_scraper_sends_the_key_and_reads_metrics_and_health(aiohttp_server) -> None:
    seen: list[str | None] = []

    async def metrics(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.Response(body=(DATA / "top_scrape_1.txt").read_bytes())

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"}, status=503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health)
    server = await aiohttp_server(app)
    scraper = Scraper(str(server.make_url("/")), api_key="sk-admin", clock=lambda: 5.0)
    scrape = await asyncio.to_thread(scraper.scrape)
    assert seen == ["Bearer sk-admin"]
    assert scrape.at == 5.0 and scrape.healthy is False
    assert scrape.value("llmserve_queue_max_depth") == 64


async def test_scraper_explains_a_401(aiohttp_server) -> None:
    async def metrics(request: web.Request) -> web.Response:
        raise web.HTTPUnauthorized()

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    server = await aiohttp_server(app)
    with pytest.raises(ScrapeError, match=r"HTTP 401 .*--api-key"):
        await asyncio.to_thread(Scraper(str(server.make_url("/"))).scrape)


def test_scraper_raises_a_typed_error_when_nothing_listens(unused_tcp_port: int) -> None:
    with pytest.raises(ScrapeError, match="refused"):
        Scraper(f"http://127.0.0.1:{unused_tcp_port}", timeout=1).scrape()
