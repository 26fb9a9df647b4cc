"""The gateway's Prometheus metrics, built on an injected `CollectorRegistry`.

One custom collector holds every `llmserve_*` series as plain dicts and bucket lists: `observe`
runs on the event loop once per request, and plain dict increments cost a tenth of
prometheus_client's locked child objects (see benchmarks/metrics.py). The gauges (queue,
in-flight, engine stats, GPU) are read from bound callables at scrape time, so nothing is polled
between scrapes. Everything here is meant to be used from the event-loop thread.

`render()` serves our registry followed by prometheus_client's default REGISTRY, where the
embedded vLLM registers its own `vllm:*` series (and where the process_* collectors live).
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from llmserve import __version__
from llmserve.admission.observer import AdmissionObserver, RejectReason
from llmserve.config import MetricsConfig
from llmserve.engine.base import EngineStats
from llmserve.records import GENERATION_ROUTES, RequestRecord

log = logging.getLogger(__name__)

PREFIX = "llmserve_"
OTHER_PRINCIPAL = "other"  # the label value of every principal beyond the cap
# `model` label values: names of the served catalog (the model a request ran, an alias
# counted as its target), at most this many; any further one (adapters loaded and unloaded
# at run time) is counted as OTHER_MODEL
MAX_MODELS = 64
OTHER_MODEL = "other"

# Buckets (seconds) chosen for LLM serving: TTFT spans a fast prefill (10 ms) to a long queue;
# inter-token latency is a decode step (1 ms on a GPU to 100s of ms on a CPU); the gateway's own
# overhead should sit well under a millisecond.
# fmt: off
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0,
                5.0, 7.5, 10.0, 20.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1,
               0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0,
               60.0, 90.0, 120.0, 180.0, 300.0, 600.0)
QUEUE_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                      20.0, 30.0, 60.0)
PREDICTION_ERROR_BUCKETS = (-30.0, -10.0, -5.0, -2.0, -1.0, -0.5, -0.1, 0.0, 0.1, 0.5, 1.0, 2.0,
                            5.0, 10.0, 30.0)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005,
                    0.0075, 0.01, 0.025, 0.05, 0.1, 0.25)
GC_PAUSE_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                    1.0)
# fmt: on


class LabelledCounter:
    def __init__(self, name: str, doc: str, labelnames: Sequence[str]) -> None:
        self.name, self.doc, self.labelnames = name, doc, tuple(labelnames)
        self.values: dict[tuple[str, ...], float] = {}
        self._prefixes: dict[tuple[str, ...], str] = {}  # rendered once per label set

    def inc(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        for labels, value in list(self.values.items()):
            family.add_metric(labels, value)
        return family

    def lines(self, out: list[str]) -> None:
        name = f"{self.name}_total"
        out.append(f"# HELP {name} {self.doc}\n# TYPE {name} counter")
        for labels, value in list(self.values.items()):
            prefix = self._prefixes.get(labels)
            if prefix is None:
                prefix = self._prefixes[labels] = name + _label_text(self.labelnames, labels)
            out.append(f"{prefix} {_number(value)}")


class Counter:
    """A counter without labels (e.g. `limiter_store_errors.inc()`)."""

    def __init__(self, family: LabelledCounter) -> None:
        self._family = family
        family.values[()] = 0.0

    @property
    def value(self) -> float:
        return self._family.values[()]

    def inc(self, amount: float = 1.0) -> None:
        self._family.inc((), amount)


class Histogram:
    """Cumulative-on-read bucket counts; `observe_many` sorts once instead of N observe calls."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # last slot: above every bound (+Inf only)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def observe_many(self, values: Iterable[float]) -> None:
        ordered = sorted(values)
        if not ordered:
            return
        below = 0
        for i, bound in enumerate(self.bounds):
            upto = bisect.bisect_right(ordered, bound, lo=below)
            self.counts[i] += upto - below
            below = upto
        self.counts[-1] += len(ordered) - below
        self.sum += sum(ordered)

    def cumulative(self) -> list[tuple[str, float]]:
        counts, total, out = list(self.counts), 0, []
        for bound, count in zip((*self.bounds, math.inf), counts, strict=True):
            total += count
            out.append((_bound_label(bound), float(total)))
        return out


class LabelledHistogram:
    def __init__(self, name: str, doc: str, labelnames: Sequence[str], bounds: Sequence[float]):
        self.name, self.doc, self.labelnames, self.bounds = name, doc, tuple(labelnames), bounds
        self.children: dict[tuple[str, ...], Histogram] = {}
        self._prefixes: dict[tuple[str, ...], tuple[list[str], str, str]] = {}

    def child(self, labels: tuple[str, ...] = ()) -> Histogram:
        found = self.children.get(labels)
        if found is None:
            found = self.children[labels] = Histogram(self.bounds)
        return found

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        for labels, hist in list(self.children.items()):
            family.add_metric(labels, hist.cumulative(), hist.sum)
        return family

    def lines(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {self.doc}\n# TYPE {self.name} histogram")
        for labels, hist in list(self.children.items()):
            buckets, count, total = self._prefixes_of(labels)
            cumulative = 0
            for prefix, n in zip(buckets, list(hist.counts), strict=True):
                cumulative += n
                out.append(f"{prefix} {cumulative}.0")
            out.append(f"{count} {cumulative}.0")
            out.append(f"{total} {_number(hist.sum)}")

    def _prefixes_of(self, labels: tuple[str, ...]) -> tuple[list[str], str, str]:
        found = self._prefixes.get(labels)
        if found is None:
            names = (*self.labelnames, "le")
            buckets = [
                f"{self.name}_bucket" + _label_text(names, (*labels, _bound_label(b)))
                for b in (*self.bounds, math.inf)
            ]
            plain = _label_text(self.labelnames, labels)
            found = (buckets, f"{self.name}_count{plain}", f"{self.name}_sum{plain}")
            self._prefixes[labels] = found
        return found


def _bound_label(bound: float) -> str:
    return "+Inf" if bound == math.inf else repr(float(bound))


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    return "NaN" if value != value else repr(float(value))


def _label_text(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    pairs = (f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + ",".join(pairs) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


@dataclass(frozen=True, slots=True)
class GpuSample:
    index: int
    utilization_ratio: float  # 0..1
    memory_used_bytes: int
    memory_total_bytes: int


class GpuProbe(Protocol):
    def sample(self) -> list[GpuSample]: ...


class NvmlProbe:
    """GPU utilization and memory through NVML, when pynvml imports and a GPU is visible."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._handles: list[Any] = []
        try:
            import pynvml  # optional: nvidia-ml-py

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            self._nvml = pynvml
        except Exception:  # no module, no driver, no device: GPU series are simply absent
            self._handles = []

    def sample(self) -> list[GpuSample]:
        out = []
        for index, handle in enumerate(self._handles):
            util = self._nvml.nvmlDeviceGetUtilizationRates(handle)
            mem = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            out.append(GpuSample(index, util.gpu / 100.0, int(mem.used), int(mem.total)))
        return out


IntGauge = Callable[[], int]


class Metrics:
    """Every `llmserve_*` series. The gateway calls `bind` once, `observe` once per request."""

    def __init__(
        self,
        registry: CollectorRegistry,
        config: MetricsConfig,
        *,
        include_default_registry: bool = True,
        gpu_probe: GpuProbe | None = None,
        time_func: Callable[[], float] = time.time,
        limiter_stats: Any = None,
        jwks_stats: Callable[[], Any] | None = None,
    ) -> None:
        self._registry = registry
        self._limiter_stats = limiter_stats  # llmserve.limits.LimiterStats, read at scrape time
        # Authenticator.jwks_stats: a llmserve.auth.jwks.JwksStats, or None without a JWKS URL
        self._jwks_stats = jwks_stats
        self._config = config
        self._include_default = include_default_registry and registry is not REGISTRY
        self._gpu = gpu_probe if gpu_probe is not None else NvmlProbe()
        self._start_time = time_func()
        self._principals: set[str] = set()
        self._models: set[str] = set()
        self._gauges: dict[str, Callable[[], Any]] = {}
        self._model: str = ""
        self._config_sha256 = ""  # the live config file's hash (server/reload.py)
        self._define()
        registry.register(self)

    def _define(self) -> None:
        c = LabelledCounter
        self.requests = c(
            "llmserve_requests",
            "Finished requests by route, HTTP status and error code.",
            ("route", "status", "code"),
        )
        self.tokens = c("llmserve_tokens", "Tokens processed by type and tier.", ("type", "tier"))
        self.principal_requests = c(
            "llmserve_principal_requests",
            "Requests per principal (capped; the rest: other).",
            ("principal",),
        )
        self.principal_tokens = c(
            "llmserve_principal_tokens",
            "Tokens per principal and type (capped).",
            ("principal", "type"),
        )
        self.rate_limited = c(
            "llmserve_rate_limit_rejections",
            "429 answers by the limit that was hit: the window, and the model when it is a "
            "window of one model (a tier's `models`; empty for the tier's own windows).",
            ("limit", "model"),
        )
        self.model_requests = c(
            "llmserve_model_requests",
            "Generation requests by the served model they named (an alias counts as its model), "
            "whatever their outcome.",
            ("model",),
        )
        self.model_tokens = c(
            "llmserve_model_tokens", "Tokens processed by served model and type.", ("model", "type")
        )
        self.disconnects = c(
            "llmserve_client_disconnects", "Clients gone before their response ended.", ("route",)
        )
        self.store_errors = c(
            "llmserve_limiter_store_errors", "Limiter store operations that failed.", ()
        )
        self.limiter_store_errors = Counter(self.store_errors)
        self.unchecked = c(
            "llmserve_limiter_unchecked_admissions",
            "Requests admitted without a limit check (store down, on_store_error: open).",
            (),
        )
        self.limiter_unchecked = Counter(self.unchecked)
        self.unavailable = c(
            "llmserve_limiter_unavailable_rejections",
            "Requests refused with 503 limiter_unavailable (store down, on_store_error: closed).",
            (),
        )
        self.settlements_lost = c(
            "llmserve_limiter_settlements_lost",
            "Settlements dropped for good (the backlog of those the store could not take was "
            "full, or still held some at shutdown): usage then differs from the ledger.",
            (),
        )
        self.shadow_refusals = c(
            "llmserve_limit_shadow_refusals",
            "Requests a tier's shadow limits would have refused (served anyway: shadow limits "
            "are counted, never enforced), by tier and window.",
            ("tier", "window"),
        )
        self.config_reloads = c(
            "llmserve_config_reloads",
            "Config reloads (SIGHUP, POST /admin/reload, server.watch_config), by result: applied, "
            "unchanged, invalid (the file did not validate), refused (a setting needing a "
            "restart).",
            ("result",),
        )
        self.settlements_deferred = c(
            "llmserve_limiter_settlements_deferred",
            "Settlements the store could not take at once (down, slow): kept and sent again "
            "once it answers.",
            (),
        )
        self.jwks_refreshes = c(
            "llmserve_jwks_refreshes",
            "Fetches of the identity provider's JWKS (auth.jwt.jwks_url) that brought a usable "
            "key set.",
            (),
        )
        self.jwks_failures = c(
            "llmserve_jwks_refresh_failures",
            "Fetches of the JWKS that failed (unreachable, TLS, HTTP error, no usable key): the "
            "last good keys stay in use.",
            (),
        )
        self.queue_rejections = c(
            "llmserve_queue_rejections",
            "Requests that left the admission queue without an engine slot, by reason "
            "(queue_full, queue_tokens, queue_timeout, deadline, cancelled, shutting_down).",
            ("reason",),
        )
        h = LabelledHistogram
        self.ttft = h(
            "llmserve_time_to_first_token_seconds",
            "Request start to the first token written.",
            (),
            TTFT_BUCKETS,
        )
        self.itl = h(
            "llmserve_inter_token_latency_seconds",
            "Gap between consecutive token chunks of a response.",
            (),
            ITL_BUCKETS,
        )
        self.e2e = h(
            "llmserve_request_duration_seconds",
            "Generation request start to its last byte, by route.",
            ("route",),
            E2E_BUCKETS,
        )
        self.queue_wait = h(
            "llmserve_queue_wait_seconds",
            "Time a request waited for an engine slot.",
            (),
            QUEUE_WAIT_BUCKETS,
        )
        self.predicted_wait = h(
            "llmserve_queue_predicted_wait_seconds",
            "What admission predicted, at the door, a request that then waited would wait.",
            (),
            QUEUE_WAIT_BUCKETS,
        )
        self.prediction_error = h(
            "llmserve_queue_wait_prediction_error_seconds",
            "The wait a request really had minus the wait predicted for it (negative: "
            "it started sooner than predicted).",
            (),
            PREDICTION_ERROR_BUCKETS,
        )
        self.overhead = h(
            "llmserve_gateway_overhead_seconds",
            "Time a generation request spent in the gateway (not queued, not in the engine).",
            (),
            OVERHEAD_BUCKETS,
        )
        self.gc_pause = h(
            "llmserve_gc_pause_seconds",
            "Garbage-collector passes of the server process, by generation: every request in "
            "flight waits this long.",
            ("generation",),
            GC_PAUSE_BUCKETS,
        )
        for unlabelled in (self.ttft, self.itl, self.queue_wait, self.overhead):
            unlabelled.child()  # exported as zeros from the start: alerts see 0, not "absent"

    def bind(
        self,
        *,
        queue_depth: IntGauge,
        in_flight: IntGauge,
        concurrency_limit: IntGauge,
        engine_stats: Callable[[], EngineStats],
        queue_limit: IntGauge | None = None,
        engine_healthy: Callable[[], bool] | None = None,
        model: str | None = None,
    ) -> None:
        """Give the scrape-time sources of the gauges (each called once per scrape)."""
        self._gauges = {
            "queue_depth": queue_depth,
            "in_flight": in_flight,
            "concurrency_limit": concurrency_limit,
            "engine_stats": engine_stats,
        }
        if queue_limit is not None:
            self._gauges["queue_limit"] = queue_limit
        if engine_healthy is not None:
            self._gauges["engine_healthy"] = engine_healthy
        self._model = model or ""

    # -- per request ------------------------------------------------------------------------

    def observe(self, record: RequestRecord) -> None:
        """Count one finished request (success or failure); cheap: a few dict increments."""
        route = record.route
        self.requests.inc((route, str(record.status), record.error_code or ""))
        if record.status == 429 and record.rejected_by:
            model = self._model_label(record.rejected_model) if record.rejected_model else ""
            self.rate_limited.inc((record.rejected_by, model))
        if record.disconnected:
            self.disconnects.inc((route,))
        self._count_tokens(record)
        if route in GENERATION_ROUTES:
            self._observe_latencies(record)

    def _count_tokens(self, record: RequestRecord) -> None:
        prompt, completion = record.prompt_tokens, record.completion_tokens
        tier = record.tier or "none"
        if prompt:
            self.tokens.inc(("prompt", tier), prompt)
        if completion:
            self.tokens.inc(("completion", tier), completion)
        if record.root_model is not None and record.route in GENERATION_ROUTES:
            self._count_model(self._model_label(record.root_model), prompt, completion)
        if not self._config.per_key or record.principal_id is None:
            return
        principal = self._principal_label(record.principal_id)
        self.principal_requests.inc((principal,))
        if prompt:
            self.principal_tokens.inc((principal, "prompt"), prompt)
        if completion:
            self.principal_tokens.inc((principal, "completion"), completion)

    def _count_model(self, model: str, prompt: int, completion: int) -> None:
        self.model_requests.inc((model,))
        if prompt:
            self.model_tokens.inc((model, "prompt"), prompt)
        if completion:
            self.model_tokens.inc((model, "completion"), completion)

    def _model_label(self, model: str) -> str:
        """A model's label value: its name (it came from the served catalog) while fewer than
        MAX_MODELS names have been seen, else OTHER_MODEL."""
        if model in self._models:
            return model
        if len(self._models) < MAX_MODELS:
            self._models.add(model)
            return model
        return OTHER_MODEL

    def _principal_label(self, principal_id: str) -> str:
        if principal_id in self._principals:
            return principal_id
        if len(self._principals) < self._config.max_principals:
            self._principals.add(principal_id)
            return principal_id
        return OTHER_PRINCIPAL

    def _observe_latencies(self, record: RequestRecord) -> None:
        self.e2e.child((record.route,)).observe(record.total_seconds)
        self.overhead.child().observe(record.overhead_seconds)
        if record.ttft_seconds is not None:
            self.ttft.child().observe(record.ttft_seconds)
        if record.queue_wait_seconds is not None:
            self.queue_wait.child().observe(record.queue_wait_seconds)
        if record.inter_token_seconds:
            self.itl.child().observe_many(record.inter_token_seconds)

    def config_reloaded(self, result: str, sha256: str) -> None:
        """A config reload ended with `result`; `sha256` is the file now live."""
        self.config_reloads.inc((result,))
        self._config_sha256 = sha256

    def config_loaded(self, sha256: str) -> None:
        self._config_sha256 = sha256

    def admission_observer(self) -> AdmissionObserver:
        """The admission queue's observer: counts its refusals by reason."""
        return _QueueObserver(self.queue_rejections, self.predicted_wait, self.prediction_error)

    def observe_gc_pause(self, generation: int, seconds: float) -> None:
        """One garbage-collector pass (server/heap.py's PauseRecorder calls this)."""
        self.gc_pause.child((str(generation),)).observe(seconds)

    # -- exposition ---------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The /metrics body and its Content-Type: our series, then the default REGISTRY's."""
        out: list[str] = []
        self._sync_limiter_stats()
        for counter in self._counters():
            counter.lines(out)
        for hist in self._histograms():
            hist.lines(out)
        for family in self._gauge_families(describe=False):
            _gauge_lines(family, out)
        out.append("")
        body = "\n".join(out).encode()
        if self._include_default:
            body += generate_latest(REGISTRY)
        return body, CONTENT_TYPE_LATEST

    def series_names(self) -> set[str]:
        """Every sample name this object can export (`_total`, `_bucket`... included)."""
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
        return {
            family.name + suffix
            for family in self._families(describe=True)
            for suffix in suffixes.get(family.type, ("",))
        }

    def describe(self) -> Iterator[Metric]:
        yield from self._families(describe=True)

    def collect(self) -> Iterator[Metric]:
        self._sync_limiter_stats()
        yield from self._families(describe=False)

    def _jwks(self) -> Any:
        return _read(self._jwks_stats) if self._jwks_stats is not None else None

    def _sync_jwks_stats(self, stats: Any) -> None:
        for counter, value in ((self.jwks_refreshes, stats and stats.refreshes),
                               (self.jwks_failures, stats and stats.failures)):  # fmt: skip
            counter.values.clear()  # no JWKS URL (any more): the series are absent
            if stats is not None:
                counter.values[()] = float(value)

    def _sync_limiter_stats(self) -> None:
        self._sync_jwks_stats(self._jwks())
        stats = self._limiter_stats
        if stats is not None:
            self.store_errors.values[()] = float(stats.store_errors)
            self.unchecked.values[()] = float(stats.admitted_unchecked)
            self.unavailable.values[()] = float(stats.rejected_unavailable)
            self.settlements_lost.values[()] = float(stats.settlements_lost)
            self.settlements_deferred.values[()] = float(stats.settlements_deferred)
            for key, count in stats.shadow_refusals.items():
                self.shadow_refusals.values[key] = float(count)

    def _families(self, describe: bool) -> Iterator[Metric]:
        for counter in self._counters():
            yield counter.family()
        for hist in self._histograms():
            yield hist.family()
        yield from self._gauge_families(describe)

    def _counters(self) -> tuple[LabelledCounter, ...]:
        return (self.requests, self.tokens, self.principal_requests, self.principal_tokens,
                self.model_requests, self.model_tokens, self.rate_limited, self.disconnects,
                self.store_errors, self.unchecked, self.unavailable, self.settlements_lost,
                self.settlements_deferred,
                self.shadow_refusals, self.config_reloads, self.queue_rejections,
                self.jwks_refreshes, self.jwks_failures)  # fmt: skip

    def _histograms(self) -> tuple[LabelledHistogram, ...]:
        return (self.ttft, self.itl, self.e2e, self.queue_wait, self.predicted_wait,
                self.prediction_error, self.overhead, self.gc_pause)  # fmt: skip

    def _gauge_families(self, describe: bool) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "llmserve_info",
            "Server version and served model (value 1).",
            labels=("version", "model"),
        )
        info.add_metric((__version__, self._model), 1.0)
        yield info
        config = GaugeMetricFamily(
            "llmserve_config_info",
            "The live config file, by the SHA-256 of its text (value 1).",
            labels=("sha256",),
        )
        if describe or self._config_sha256:
            config.add_metric((self._config_sha256,), 1.0)
        yield config
        yield GaugeMetricFamily(
            "llmserve_start_time_seconds",
            "Start time of the server, in Unix seconds.",
            value=self._start_time,
        )
        yield from _bound_gauges(self._gauges, describe)
        if describe or self._limiter_stats is not None:
            pending = self._limiter_stats.settlements_pending if self._limiter_stats else None
            yield GaugeMetricFamily(
                "llmserve_limiter_settlements_pending",
                "Settlements waiting for the store to come back (sent in order once it does).",
                value=float(pending) if pending is not None else None,
            )
        yield from _jwks_gauges(self._jwks() if not describe else None, describe)
        yield from _gpu_gauges(self._gpu, describe)


_GAUGE_DOCS = {
    "queue_depth": ("llmserve_queue_depth", "Requests waiting for an engine slot."),
    "queue_limit": ("llmserve_queue_max_depth", "Most requests allowed to wait (beyond: 503)."),
    "in_flight": ("llmserve_in_flight_requests", "Requests holding an engine slot."),
    "concurrency_limit": ("llmserve_concurrency_limit", "Engine slots (requests at once)."),
    "engine_healthy": ("llmserve_engine_healthy", "1 when the engine can serve, else 0."),
}
_RANK_DOCS = {
    "kv_cache_usage": ("llmserve_engine_rank_kv_cache_usage_ratio",
                       "Fraction of one engine's KV cache in use (0-1), by data-parallel rank."),
    "running": ("llmserve_engine_rank_running_requests",
                "Requests one engine is running, by data-parallel rank."),
}  # fmt: skip
_ENGINE_DOCS = {
    "kv_cache_usage": ("llmserve_kv_cache_usage_ratio",
                       "Fraction of the KV cache in use (0-1); the fullest engine's with data "
                       "parallelism."),
    "running": ("llmserve_engine_running_requests", "Requests the engine is running."),
    "waiting": ("llmserve_engine_waiting_requests", "Requests waiting inside the engine."),
}


def _bound_gauges(sources: dict[str, Callable[[], Any]], describe: bool) -> Iterator[Metric]:
    names = list(_GAUGE_DOCS) if describe else [n for n in _GAUGE_DOCS if n in sources]
    for key in names:
        name, doc = _GAUGE_DOCS[key]
        value = None if describe else _read(sources[key])
        if describe or value is not None:
            yield GaugeMetricFamily(name, doc, value=float(value) if value is not None else None)
    if describe or "engine_stats" in sources:
        stats = None if describe else _read(sources["engine_stats"])
        for attr, (name, doc) in _ENGINE_DOCS.items():
            if describe or stats is not None:
                value = float(getattr(stats, attr)) if stats is not None else None
                yield GaugeMetricFamily(name, doc, value=value)
        yield from _rank_gauges(stats, describe)


def _rank_gauges(stats: EngineStats | None, describe: bool) -> Iterator[Metric]:
    """Each engine's own numbers (data parallel: one engine per rank)."""
    if not describe and (stats is None or not stats.ranks):
        return
    for attr, (name, doc) in _RANK_DOCS.items():
        family = GaugeMetricFamily(name, doc, labels=("rank",))
        for rank in stats.ranks if stats is not None else ():
            family.add_metric((str(rank.rank),), float(getattr(rank, attr)))
        yield family


def _gauge_lines(family: Metric, out: list[str]) -> None:
    out.append(f"# HELP {family.name} {family.documentation}\n# TYPE {family.name} gauge")
    for sample in family.samples:
        labels = _label_text(tuple(sample.labels), tuple(sample.labels.values()))
        out.append(f"{sample.name}{labels} {_number(sample.value)}")


def _read(source: Callable[[], Any]) -> Any:
    """A failing source drops its gauge from this scrape instead of failing the whole scrape."""
    try:
        return source()
    except Exception:
        log.debug("metrics source %r failed", source, exc_info=True)
        return None


def _jwks_gauges(stats: Any, describe: bool) -> Iterator[Metric]:
    """The JWKS fetched from auth.jwt.jwks_url: absent without one."""
    if not describe and stats is None:
        return
    last = stats.last_success if stats is not None else None
    yield GaugeMetricFamily(
        "llmserve_jwks_last_success_timestamp_seconds",
        "When the JWKS was last fetched with usable keys, in Unix seconds (0: never yet).",
        value=None if describe else float(last or 0.0),
    )
    yield GaugeMetricFamily(
        "llmserve_jwks_keys",
        "Verification keys in use from the JWKS (0: JWTs get 503 auth_unavailable).",
        value=None if describe else float(stats.keys),
    )


_GPU_DOCS = (
    ("llmserve_gpu_utilization_ratio", "GPU busy fraction over the last sample period (NVML)."),
    ("llmserve_gpu_memory_used_bytes", "GPU memory in use (NVML)."),
    ("llmserve_gpu_memory_total_bytes", "GPU memory in total (NVML)."),
)


def _gpu_gauges(probe: GpuProbe, describe: bool) -> Iterator[Metric]:
    samples = [] if describe else (_read(probe.sample) or [])
    if not describe and not samples:
        return  # no GPU: the series are absent, not zero
    families = [GaugeMetricFamily(name, doc, labels=("gpu",)) for name, doc in _GPU_DOCS]
    for s in samples:
        gpu = (str(s.index),)
        families[0].add_metric(gpu, s.utilization_ratio)
        families[1].add_metric(gpu, float(s.memory_used_bytes))
        families[2].add_metric(gpu, float(s.memory_total_bytes))
    yield from families


class _QueueObserver:
    """AdmissionObserver feeding llmserve_queue_rejections_total (admissions and releases are
    already measured per request: llmserve_queue_wait_seconds, the latency histograms)."""

    def __init__(
        self,
        rejections: LabelledCounter,
        predicted: LabelledHistogram,
        error: LabelledHistogram,
    ) -> None:
        self._rejections = rejections
        self._predicted = predicted
        self._error = error

    def admitted(self, priority: int, wait_seconds: float) -> None:
        pass

    def rejected(self, priority: int, reason: RejectReason, wait_seconds: float) -> None:
        self._rejections.inc((reason,))

    def released(self, priority: int, held_seconds: float) -> None:
        pass

    def predicted(self, priority: int, predicted_seconds: float, waited_seconds: float) -> None:
        self._predicted.child().observe(predicted_seconds)
        self._error.child().observe(waited_seconds - predicted_seconds)
