from __future__ import annotations

import re

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Gauge

from llmserve.config import MetricsConfig
from llmserve.engine.base import EngineStats
from llmserve.metrics import MAX_MODELS, OTHER_MODEL, OTHER_PRINCIPAL, GpuSample, Metrics
from llmserve.records import RequestRecord


class FakeGpu:
    def __init__(self, samples: list[GpuSample]) -> None:
        self.samples = samples

    def sample(self) -> list[GpuSample]:
        return self.samples


def make_metrics(
    gpus: list[GpuSample] | None = None, **config: object
) -> tuple[Metrics, CollectorRegistry]:
    registry = CollectorRegistry()
    metrics = Metrics(
        registry,
        MetricsConfig(**config),
        include_default_registry=False,
        gpu_probe=FakeGpu(gpus or []),
        time_func=lambda: 1_700_000_000.0,
    )
    return metrics, registry


def chat(**kw: object) -> RequestRecord:
    base: dict[str, object] = dict(
        request_id="r1", route="chat", started_at=0.0, principal_id="key_a", tier="pro",
        model="m", status=200,
    )  # fmt: skip
    return RequestRecord(**{**base, **kw})  # type: ignore[arg-type]


def test_success_counts_request_tokens_and_latencies() -> None:
    metrics, reg = make_metrics()
    metrics.observe(
        chat(
            prompt_tokens=12, completion_tokens=5, finish_reason="stop", queue_wait_seconds=0.02,
            ttft_seconds=0.3, total_seconds=1.2, engine_seconds=1.1795,
            inter_token_seconds=[0.01, 0.01, 0.05, 2.0],
        )
    )  # fmt: skip
    value = reg.get_sample_value
    assert value("llmserve_requests_total", {"route": "chat", "status": "200", "code": ""}) == 1
    assert value("llmserve_tokens_total", {"type": "prompt", "tier": "pro"}) == 12
    assert value("llmserve_tokens_total", {"type": "completion", "tier": "pro"}) == 5
    assert value("llmserve_principal_requests_total", {"principal": "key_a"}) == 1
    assert value("llmserve_principal_tokens_total", {"principal": "key_a", "type": "prompt"}) == 12
    ttft = "llmserve_time_to_first_token_seconds"
    assert value(f"{ttft}_bucket", {"le": "0.2"}) == 0
    assert value(f"{ttft}_bucket", {"le": "0.3"}) == 1  # bounds are inclusive (le)
    assert value(f"{ttft}_sum") == pytest.approx(0.3)
    itl = "llmserve_inter_token_latency_seconds"
    assert value(f"{itl}_bucket", {"le": "0.01"}) == 2
    assert value(f"{itl}_bucket", {"le": "0.05"}) == 3
    assert value(f"{itl}_bucket", {"le": "1.0"}) == 3
    assert value(f"{itl}_bucket", {"le": "+Inf"}) == 4
    assert value(f"{itl}_count") == 4
    assert value(f"{itl}_sum") == pytest.approx(2.07)
    e2e = "llmserve_request_duration_seconds"
    assert value(f"{e2e}_count", {"route": "chat"}) == 1
    assert value(f"{e2e}_sum", {"route": "chat"}) == pytest.approx(1.2)
    assert value("llmserve_queue_wait_seconds_sum") == pytest.approx(0.02)
    overhead = "llmserve_gateway_overhead_seconds"
    assert value(f"{overhead}_sum") == pytest.approx(0.0005)  # 1.2 - 1.1795 - 0.02
    assert value(f"{overhead}_bucket", {"le": "0.0005"}) == 1
    assert value(f"{overhead}_bucket", {"le": "0.00025"}) == 0


def test_429_is_counted_by_the_limit_that_was_hit() -> None:
    metrics, reg = make_metrics()
    for limit in ("tokens_per_minute", "tokens_per_minute", "requests_per_minute"):
        metrics.observe(chat(status=429, error_code="rate_limit_exceeded", rejected_by=limit))
    metrics.observe(
        chat(
            status=429,
            error_code="rate_limit_exceeded",
            rejected_by="tokens_per_day",
            rejected_model="sql",
        )
    )  # a window of one model (a tier's `models`)
    value = reg.get_sample_value
    rejections = "llmserve_rate_limit_rejections_total"
    assert value(rejections, {"limit": "tokens_per_minute", "model": ""}) == 2
    assert value(rejections, {"limit": "requests_per_minute", "model": ""}) == 1
    assert value(rejections, {"limit": "tokens_per_day", "model": "sql"}) == 1
    labels = {"route": "chat", "status": "429", "code": "rate_limit_exceeded"}
    assert value("llmserve_requests_total", labels) == 4
    assert value("llmserve_time_to_first_token_seconds_count") == 0  # never got a token
    assert value("llmserve_tokens_total", {"type": "prompt", "tier": "pro"}) is None


def test_503_and_500_are_counted_by_status_and_code() -> None:
    metrics, reg = make_metrics()
    metrics.observe(chat(status=503, error_code="server_overloaded"))
    metrics.observe(chat(status=503, error_code="queue_timeout", queue_wait_seconds=30.0))
    metrics.observe(chat(status=500, error_code="engine_error", prompt_tokens=7))
    value = reg.get_sample_value
    requests = "llmserve_requests_total"
    assert value(requests, {"route": "chat", "status": "503", "code": "server_overloaded"}) == 1
    assert value(requests, {"route": "chat", "status": "503", "code": "queue_timeout"}) == 1
    assert value(requests, {"route": "chat", "status": "500", "code": "engine_error"}) == 1
    assert value("llmserve_queue_wait_seconds_bucket", {"le": "20.0"}) == 0
    assert value("llmserve_queue_wait_seconds_bucket", {"le": "30.0"}) == 1
    assert value("llmserve_tokens_total", {"type": "prompt", "tier": "pro"}) == 7
    assert value("llmserve_principal_requests_total", {"principal": "key_a"}) == 3


def test_disconnect_is_counted_and_its_tokens_too() -> None:
    metrics, reg = make_metrics()
    metrics.observe(chat(status=200, disconnected=True, completion_tokens=3, ttft_seconds=0.1))
    value = reg.get_sample_value
    assert value("llmserve_client_disconnects_total", {"route": "chat"}) == 1
    assert value("llmserve_tokens_total", {"type": "completion", "tier": "pro"}) == 3


def test_non_generation_routes_count_requests_but_no_latency() -> None:
    metrics, reg = make_metrics()
    metrics.observe(chat(route="health", principal_id=None, tier=None, total_seconds=0.001))
    value = reg.get_sample_value
    assert value("llmserve_requests_total", {"route": "health", "status": "200", "code": ""}) == 1
    assert value("llmserve_request_duration_seconds_count", {"route": "health"}) is None
    assert value("llmserve_gateway_overhead_seconds_count") == 0


def test_ten_thousand_principals_stay_under_the_label_cap() -> None:
    metrics, reg = make_metrics(max_principals=100)
    for i in range(10_000):
        metrics.observe(chat(principal_id=f"key_{i}", prompt_tokens=1, completion_tokens=2))
    metrics.observe(chat(principal_id="key_7", prompt_tokens=1))  # a known one keeps its label
    text = metrics.render()[0].decode()
    principals = set(re.findall(r'llmserve_principal_requests_total\{principal="([^"]+)"', text))
    assert len(principals) == 101
    assert OTHER_PRINCIPAL in principals
    value = reg.get_sample_value
    assert value("llmserve_principal_requests_total", {"principal": OTHER_PRINCIPAL}) == 9_900
    assert value("llmserve_principal_requests_total", {"principal": "key_7"}) == 2
    tokens = "llmserve_principal_tokens_total"
    assert value(tokens, {"principal": OTHER_PRINCIPAL, "type": "completion"}) == 19_800
    assert text.count("llmserve_principal_tokens_total{") == 202


def test_per_key_switch_off_exports_no_principal_series() -> None:
    metrics, reg = make_metrics(per_key=False)
    metrics.observe(chat(prompt_tokens=3))
    assert "principal=" not in metrics.render()[0].decode()
    assert reg.get_sample_value("llmserve_tokens_total", {"type": "prompt", "tier": "pro"}) == 3


def test_gauges_are_read_from_the_bound_sources_at_scrape_time() -> None:
    metrics, reg = make_metrics()
    depth = [3]
    metrics.bind(
        queue_depth=lambda: depth[0], in_flight=lambda: 7, concurrency_limit=lambda: 16,
        queue_limit=lambda: 64, engine_healthy=lambda: True, model="smollm2",
        engine_stats=lambda: EngineStats(kv_cache_usage=0.5, running=7, waiting=2),
    )  # fmt: skip
    value = reg.get_sample_value
    assert value("llmserve_queue_depth") == 3
    depth[0] = 9
    assert value("llmserve_queue_depth") == 9
    assert value("llmserve_queue_max_depth") == 64
    assert value("llmserve_in_flight_requests") == 7
    assert value("llmserve_concurrency_limit") == 16
    assert value("llmserve_kv_cache_usage_ratio") == 0.5
    assert value("llmserve_engine_running_requests") == 7
    assert value("llmserve_engine_waiting_requests") == 2
    assert value("llmserve_engine_healthy") == 1
    assert value("llmserve_info", {"version": "0.1.0", "model": "smollm2"}) == 1
    assert value("llmserve_start_time_seconds") == 1_700_000_000.0


def test_a_failing_source_drops_its_gauge_but_not_the_scrape() -> None:
    metrics, _reg = make_metrics()

    def dead_engine() -> EngineStats:
        raise RuntimeError("engine is dead")

    metrics.bind(queue_depth=lambda: 1, in_flight=lambda: 0, concurrency_limit=lambda: 4,
                 engine_stats=dead_engine)  # fmt: skip
    text = metrics.render()[0].decode()
    assert "llmserve_queue_depth 1.0" in text
    assert "llmserve_kv_cache_usage_ratio" not in text


def test_gpu_series_are_absent_without_a_gpu_and_present_with_one() -> None:
    metrics, _ = make_metrics()
    assert "llmserve_gpu" not in metrics.render()[0].decode()
    metrics, reg = make_metrics(gpus=[GpuSample(0, 0.75, 10 * 2**30, 80 * 2**30)])
    assert reg.get_sample_value("llmserve_gpu_utilization_ratio", {"gpu": "0"}) == 0.75
    assert reg.get_sample_value("llmserve_gpu_memory_used_bytes", {"gpu": "0"}) == 10 * 2**30
    assert reg.get_sample_value("llmserve_gpu_memory_total_bytes", {"gpu": "0"}) == 80 * 2**30


def test_real_nvml_probe_is_harmless_on_a_machine_without_gpu() -> None:
    metrics = Metrics(CollectorRegistry(), MetricsConfig(), include_default_registry=False)
    assert b"llmserve_requests_total" in metrics.render()[0]


def test_limiter_store_errors_counter() -> None:
    metrics, reg = make_metrics()
    metrics.limiter_store_errors.inc()
    metrics.limiter_store_errors.inc()
    assert reg.get_sample_value("llmserve_limiter_store_errors_total") == 2


def test_render_appends_the_default_registry_where_vllm_registers() -> None:
    gauge = Gauge("vllm:test_only_gauge", "stands in for vLLM's series", registry=REGISTRY)
    try:
        gauge.set(42)
        metrics = Metrics(CollectorRegistry(), MetricsConfig(), gpu_probe=FakeGpu([]))
        body, content_type = metrics.render()
        text = body.decode()
        assert "vllm:test_only_gauge 42.0" in text
        assert text.index("llmserve_requests_total") < text.index("vllm:test_only_gauge")
        assert content_type.startswith("text/plain")
    finally:
        REGISTRY.unregister(gauge)


def test_every_name_follows_the_prometheus_naming_guide() -> None:
    metrics, _ = make_metrics()
    names = metrics.series_names()
    assert names, "no series"
    for name in names:
        assert name.startswith("llmserve_"), name
        assert ":" not in name, name
        assert re.fullmatch(r"[a-z_]+", name), name
    histograms = {n.removesuffix("_bucket") for n in names if n.endswith("_bucket")}
    assert histograms and all(h.endswith("_seconds") for h in histograms)
    assert {n for n in names if "requests" in n and n.endswith("_total")}


def test_two_metrics_objects_on_fresh_registries_do_not_share_state() -> None:
    first, reg1 = make_metrics()
    _second, reg2 = make_metrics()
    first.observe(chat())
    assert reg1.get_sample_value("llmserve_principal_requests_total", {"principal": "key_a"}) == 1
    assert (
        reg2.get_sample_value("llmserve_principal_requests_total", {"principal": "key_a"}) is None
    )


def test_fast_render_says_exactly_what_prometheus_client_would() -> None:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    metrics, reg = make_metrics(gpus=[GpuSample(0, 0.5, 1, 2)])
    metrics.bind(queue_depth=lambda: 1, in_flight=lambda: 2, concurrency_limit=lambda: 3,
                 engine_stats=lambda: EngineStats(0.25, 2, 1), model='q"uo\\te\nd')  # fmt: skip
    metrics.observe(chat(principal_id='we"ird\\key\n', prompt_tokens=3, ttft_seconds=0.2,
                         total_seconds=0.3, inter_token_seconds=[0.01, 0.2]))  # fmt: skip
    metrics.observe(chat(route="completions", status=429, rejected_by="tokens_per_day"))
    metrics.limiter_store_errors.inc()

    def samples(text: str) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
        return {
            (s.name, tuple(sorted(s.labels.items())), s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    ours = metrics.render()[0].decode()
    reference = generate_latest(reg).decode()
    assert samples(ours) == samples(reference)
    assert len(samples(ours)) > 100


def test_queue_refusals_are_counted_by_reason():
    from prometheus_client import CollectorRegistry

    from llmserve.admission import AdmissionQueue
    from llmserve.config import MetricsConfig
    from llmserve.errors import ServiceUnavailable
    from llmserve.metrics import Metrics

    metrics = Metrics(CollectorRegistry(), MetricsConfig())
    queue = AdmissionQueue(1, 0, 30, observer=metrics.admission_observer())
    queue.enqueue()  # takes the only slot
    for _ in range(2):
        with pytest.raises(ServiceUnavailable):
            queue.enqueue()
    body = metrics.render()[0].decode()
    assert 'llmserve_queue_rejections_total{reason="queue_full"} 2' in body


def test_limiter_refusals_for_a_dead_store_and_lost_settlements_are_exported():
    from prometheus_client import CollectorRegistry

    from llmserve.config import MetricsConfig
    from llmserve.limits.limiter import LimiterStats
    from llmserve.metrics import Metrics

    stats = LimiterStats(rejected_unavailable=3, settlements_lost=2)
    body = Metrics(CollectorRegistry(), MetricsConfig(), limiter_stats=stats).render()[0].decode()
    assert "llmserve_limiter_unavailable_rejections_total 3" in body
    assert "llmserve_limiter_settlements_lost_total 2" in body


def test_requests_and_tokens_are_counted_by_the_model_run() -> None:
    metrics, reg = make_metrics()
    metrics.observe(chat(model="gpt-sql", root_model="sql", prompt_tokens=7, completion_tokens=3))
    metrics.observe(chat(model="sql", root_model="sql", status=429, rejected_by="tokens_per_day"))
    metrics.observe(chat(model="nope", status=404, error_code="model_not_found"))  # no model run
    metrics.observe(chat(route="tokenize", model="sql", root_model="sql"))  # not a generation
    value = reg.get_sample_value
    assert value("llmserve_model_requests_total", {"model": "sql"}) == 2  # served or refused
    assert value("llmserve_model_tokens_total", {"model": "sql", "type": "prompt"}) == 7
    assert value("llmserve_model_tokens_total", {"model": "sql", "type": "completion"}) == 3
    assert {s.labels["model"] for family in reg.collect() for s in family.samples
            if s.name == "llmserve_model_requests_total"} == {"sql"}  # fmt: skip


def test_model_label_values_are_bounded() -> None:
    metrics, reg = make_metrics()
    for i in range(MAX_MODELS + 10):  # adapters loaded and unloaded at run time, say
        metrics.observe(chat(root_model=f"adapter-{i}", completion_tokens=1))
    models = {s.labels["model"] for family in reg.collect() for s in family.samples
              if s.name == "llmserve_model_requests_total"}  # fmt: skip
    assert len(models) == MAX_MODELS + 1 and OTHER_MODEL in models
    assert reg.get_sample_value("llmserve_model_requests_total", {"model": OTHER_MODEL}) == 10
