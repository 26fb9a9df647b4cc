"""The example Grafana dashboard and alert rules query only series the server exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from llmserve.config import MetricsConfig
from llmserve.metrics import Metrics

EXAMPLES = Path(__file__).parent.parent / "examples"
METRIC_NAME = re.compile(r"\b(llmserve_[a-z_]+|vllm:[a-z_:]+)")


def exported_names() -> set[str]:
    metrics = Metrics(CollectorRegistry(), MetricsConfig(), include_default_registry=False)
    return metrics.series_names()


def dashboard_queries() -> list[str]:
    dashboard = json.loads((EXAMPLES / "grafana-dashboard.json").read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


def alert_queries() -> list[str]:
    rules = yaml.safe_load((EXAMPLES / "alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def test_grafana_dashboard_queries_name_only_exported_metrics() -> None:
    queries = dashboard_queries()
    assert len(queries) >= 15
    exported = exported_names()
    for expr in queries:
        used = set(METRIC_NAME.findall(expr))
        assert used, f"query names no llmserve metric: {expr}"
        assert used <= exported, f"{expr}: not exported: {used - exported}"


def test_grafana_dashboard_covers_the_headline_metrics() -> None:
    used = {name for expr in dashboard_queries() for name in METRIC_NAME.findall(expr)}
    for name in (
        "llmserve_time_to_first_token_seconds_bucket",
        "llmserve_inter_token_latency_seconds_bucket",
        "llmserve_queue_wait_seconds_bucket",
        "llmserve_gateway_overhead_seconds_bucket",
        "llmserve_rate_limit_rejections_total",
        "llmserve_kv_cache_usage_ratio",
        "llmserve_principal_tokens_total",
    ):
        assert name in used


def test_alert_rules_name_only_exported_metrics_and_cover_queue_errors_ttft() -> None:
    queries = alert_queries()
    exported = exported_names()
    for expr in queries:
        used = set(METRIC_NAME.findall(expr))
        assert used and used <= exported, expr
    joined = " ".join(queries)
    assert "llmserve_queue_depth" in joined
    assert 'status=~"5.."' in joined
    assert "histogram_quantile(0.95" in joined and "time_to_first_token" in joined


def test_prometheus_config_scrapes_metrics_and_loads_the_alerts() -> None:
    config = yaml.safe_load((EXAMPLES / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    job = config["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8000"]
