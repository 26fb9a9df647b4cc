"""The dashboard as a pure function: (snapshot of two scrapes, history, status) -> renderable."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich import box
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from llmserve.top.scrape import Scrape
from llmserve.top.stats import QUANTILES, History, Point, Snapshot, summarize

KV_WARN, KV_CRITICAL = 0.80, 0.92  # KV cache: yellow from 80%, red from 92% (preemption nears)
QUEUE_WARN, QUEUE_CRITICAL = 0.50, 0.90  # queue depth against its limit
BAR_WIDTH = 12
SPARK_WIDTH = 16
MAX_PRINCIPAL_ROWS = 5
MAX_MODEL_ROWS = 5
SPARKS = "▁▂▃▄▅▆▇█"
KEYS_HELP = "q quit · space pause · +/- interval"


# Borderless tables keep the whole dashboard inside an 80x24 terminal.
def _table(title: str) -> Table:
    return Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", title_style="bold",
                 expand=True, padding=(0, 1))  # fmt: skip


@dataclass(frozen=True, slots=True)
class ViewState:
    url: str
    interval: float
    snapshot: Snapshot | None  # None until two scrapes succeeded
    history: Sequence[Point] = ()
    error: str | None = None  # the last scrape failed: the server is unreachable
    paused: bool = False


def render_scrapes(
    previous: Scrape, current: Scrape, url: str, interval: float, history: History | None = None
) -> RenderableType:
    """Convenience for `--once` and tests: the dashboard of exactly two scrapes."""
    snapshot = summarize(previous, current)
    points = history.points if history is not None else [_point_of(snapshot)]
    return render_dashboard(ViewState(url, interval, snapshot, tuple(points)))


def _point_of(snapshot: Snapshot) -> Point:
    history = History()
    history.add(snapshot)
    return history.points[0]


def render_dashboard(state: ViewState) -> RenderableType:
    parts: list[RenderableType] = [_header(state)]
    snap = state.snapshot
    if snap is not None:
        parts.append(_side_by_side(_gauges(snap), _sparklines(state.history, snap)))
        parts.append(_side_by_side(_latency_table(snap), _admission_table(snap), (4, 3)))
        parts.append(_side_by_side(_principals_table(snap), _models_table(snap)))
    elif state.error is None:
        parts.append(Text("waiting for a second scrape to compute rates...", style="dim"))
    return Group(*parts)


def _header(state: ViewState) -> RenderableType:
    snap = state.snapshot
    line = Text()
    if snap is not None:
        line.append("model ", "dim").append(snap.model, "bold")
        if snap.version:
            line.append(f"  llmserve {snap.version}", "dim")
        line.append("   uptime ", "dim").append(format_duration(snap.uptime_seconds))
    line.append("   health ", "dim").append_text(_health(state))
    line.append(f"   every {state.interval:g}s", "dim")
    if state.paused:
        line.append("   PAUSED", "bold yellow")
    title = f"llmserve top · {state.url}"
    return Panel(line, title=title, title_align="left", subtitle=KEYS_HELP, subtitle_align="right")


def _health(state: ViewState) -> Text:
    if state.error is not None:
        return Text(f"unreachable ({state.error}), retrying", "bold red")
    snap = state.snapshot
    if snap is None:
        return Text("connecting", "dim")
    if snap.healthy is False or snap.engine_healthy is False:
        return Text("degraded", "bold yellow")
    return Text("ok", "bold green")


def _side_by_side(
    left: RenderableType, right: RenderableType, ratios: tuple[int, int] = (1, 1)
) -> Table:
    grid = Table.grid(expand=True, padding=(0, 1))
    grid.add_column(ratio=ratios[0])
    grid.add_column(ratio=ratios[1])
    grid.add_row(left, right)
    return grid


def _gauges(snap: Snapshot) -> Panel:
    grid = Table.grid(padding=(0, 1))
    kv = snap.kv_cache_usage
    kv_style = _level(kv, KV_WARN, KV_CRITICAL)
    grid.add_row("KV cache", _bar(kv, kv_style), Text(_percent(kv), kv_style))
    for rank, usage in snap.rank_kv_cache_usage:  # data parallel: each engine's own
        style = _level(usage, KV_WARN, KV_CRITICAL)
        grid.add_row(f" rank {rank}", _bar(usage, style), Text(_percent(usage), style))
    grid.add_row("running", Text(_count(snap.running)), Text(f"waiting {_count(snap.waiting)}"))
    queue_ratio = _ratio(snap.queue_depth, snap.queue_limit)
    queue_style = _level(queue_ratio, QUEUE_WARN, QUEUE_CRITICAL)
    grid.add_row(
        "queue",
        _bar(queue_ratio, queue_style),
        Text(f"{_count(snap.queue_depth)} / {_count(snap.queue_limit)}", queue_style),
    )
    flight_ratio = _ratio(snap.in_flight, snap.concurrency_limit)
    grid.add_row(
        "in-flight",
        _bar(flight_ratio, "cyan"),
        Text(f"{_count(snap.in_flight)} / {_count(snap.concurrency_limit)}"),
    )
    return Panel(grid, title="engine", title_align="left")


def _sparklines(history: Sequence[Point], snap: Snapshot) -> Panel:
    grid = Table.grid(padding=(0, 1))
    rows = (
        ("req/s", [p.requests_per_second for p in history], snap.requests_per_second),
        ("tok/s", [p.tokens_per_second for p in history], snap.completion_tokens_per_second),
        ("TTFT p95", [p.ttft_p95 for p in history], snap.latencies["TTFT"][1]),
        ("queue", [p.queue_depth for p in history], snap.queue_depth),
    )
    for title, values, now in rows:
        shown = format_seconds(now) if title == "TTFT p95" else format_rate(now)
        grid.add_row(title, Text(sparkline(values, SPARK_WIDTH), "cyan"), shown)
    return Panel(grid, title="last minute", title_align="left")


def _latency_table(snap: Snapshot) -> Table:
    table = _table(f"latency, last {snap.seconds:.1f}s")
    table.add_column("", no_wrap=True)
    for q in QUANTILES:
        table.add_column(f"p{q * 100:g}", justify="right", no_wrap=True)
    for title, values in snap.latencies.items():
        table.add_row(title, *(format_seconds(v) for v in values))
    return table


def _admission_table(snap: Snapshot) -> Table:
    table = _table("admission")
    table.add_column("", no_wrap=True)
    table.add_column("recent", justify="right", no_wrap=True)
    table.add_column("total", justify="right", no_wrap=True)
    for limit, (recent, total) in snap.rejected_by_limit.items():
        table.add_row(f"429 {limit}", _count(recent), _count(total), style=_alert(recent))
    recent_503, total_503 = snap.unavailable
    table.add_row(
        "503 unavailable", _count(recent_503), _count(total_503), style=_alert(recent_503)
    )
    recent_5xx, total_5xx = snap.server_errors
    table.add_row(
        "5xx errors", _count(recent_5xx), _count(total_5xx), style=_alert(recent_5xx, "red")
    )
    return table


def _principals_table(snap: Snapshot) -> Table:
    table = _table("busiest principals")
    table.add_column("principal")
    table.add_column("tokens/s", justify="right")
    table.add_column("requests/s", justify="right")
    for p in snap.principals[:MAX_PRINCIPAL_ROWS]:
        table.add_row(p.name, format_rate(p.tokens_per_second), format_rate(p.requests_per_second))
    if not snap.principals:
        table.add_row(Text("no traffic", "dim"), "", "")
    return table


def _models_table(snap: Snapshot) -> Table:
    """Usage by served model (an alias counts as its model), busiest first; models idle since
    the last scrape stay listed with their total."""
    table = _table("models")
    table.add_column("model")
    table.add_column("tok/s", justify="right")
    table.add_column("req/s", justify="right")
    table.add_column("tokens", justify="right")
    for m in snap.models[:MAX_MODEL_ROWS]:
        table.add_row(m.name, format_rate(m.tokens_per_second),
                      format_rate(m.requests_per_second), _count(m.tokens))  # fmt: skip
    if not snap.models:
        table.add_row(Text("no requests yet", "dim"), "", "", "")
    return table


def sparkline(values: Sequence[float | None], width: int) -> str:
    """The last `width` values as block characters scaled to their maximum ("·" = no value)."""
    recent = list(values)[-width:]
    top = max((v for v in recent if v is not None), default=0.0)
    chars = []
    for v in recent:
        if v is None:
            chars.append("·")
        else:
            level = 0 if top <= 0 else round(v / top * (len(SPARKS) - 1))
            chars.append(SPARKS[level])
    return "".join(chars).rjust(width)


def _bar(ratio: float | None, style: str) -> Text:
    if ratio is None:
        return Text("·" * BAR_WIDTH, "dim")
    filled = round(max(0.0, min(1.0, ratio)) * BAR_WIDTH)
    return Text("█" * filled, style) + Text("░" * (BAR_WIDTH - filled), "dim")


def _level(ratio: float | None, warn: float, critical: float) -> str:
    if ratio is None or ratio < warn:
        return "green"
    return "yellow" if ratio < critical else "bold red"


def _alert(recent: float, style: str = "yellow") -> str:
    return style if recent > 0 else ""


def _ratio(value: float | None, limit: float | None) -> float | None:
    if value is None or not limit:
        return None
    return value / limit


def _percent(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio * 100:.1f}%"


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def format_rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def format_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 0.001:
        return f"{value * 1e6:.0f} µs"
    if value < 0.1:
        return f"{value * 1e3:.1f} ms"
    if value < 1:
        return f"{value * 1e3:.0f} ms"
    return f"{value:.2f} s"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s"
