"""Fetch a server's /metrics (and /health) and parse the `llmserve_*` samples of the text.

The parser reads only the lines `top` needs (by prefix): vLLM's hundred-odd `vllm:*` series are
skipped with one `startswith` each, which keeps `top` far under its CPU budget.
"""

from __future__ import annotations

import math
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from llmserve.errors import LLMServeError

Labels = dict[str, str]
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


class ScrapeError(LLMServeError):
    """The server could not be scraped (down, refused, timeout, HTTP error)."""


@dataclass(slots=True)
class Scrape:
    """The samples of one /metrics response, by sample name, and when it was taken."""

    at: float  # monotonic seconds: rates divide by differences of this
    wall: float  # epoch seconds: for uptime
    samples: dict[str, list[tuple[Labels, float]]] = field(default_factory=dict)
    healthy: bool | None = None  # /health answered 2xx; None when not asked

    def series(self, name: str) -> list[tuple[Labels, float]]:
        return self.samples.get(name, [])

    def value(self, name: str, **match: str) -> float | None:
        for labels, value in self.series(name):
            if _matches(labels, match):
                return value
        return None

    def total(self, name: str, **match: str) -> float:
        return sum(v for labels, v in self.series(name) if _matches(labels, match))

    def buckets(self, name: str) -> list[tuple[float, float]]:
        """Cumulative (upper bound, count) of a histogram, summed over its other labels."""
        summed: dict[float, float] = {}
        for labels, value in self.series(f"{name}_bucket"):
            bound = float(labels.get("le", "+Inf"))
            summed[bound] = summed.get(bound, 0.0) + value
        return sorted(summed.items())


def _matches(labels: Labels, match: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in match.items())


def parse_metrics(text: str, prefix: str = "llmserve_") -> dict[str, list[tuple[Labels, float]]]:
    """Samples of the Prometheus text format whose name starts with `prefix`."""
    out: dict[str, list[tuple[Labels, float]]] = {}
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue  # comments, blank lines, other exporters' series
        parsed = _parse_line(line)
        if parsed is not None:
            name, labels, value = parsed
            out.setdefault(name, []).append((labels, value))
    return out


def _parse_line(line: str) -> tuple[str, Labels, float] | None:
    brace = line.find("{")
    try:
        if brace < 0:
            name, value, *_ = line.split()
            return name, {}, _float(value)
        close = line.rindex("}")
        labels = {k: _unescape(v) for k, v in _LABEL.findall(line, brace, close)}
        return line[:brace], labels, _float(line[close + 1 :].split()[0])
    except (ValueError, IndexError):
        return None  # a line we do not understand is skipped, never fatal


def _float(text: str) -> float:
    return {"+Inf": math.inf, "-Inf": -math.inf}.get(text) or float(text)


def _unescape(value: str) -> str:
    if "\\" not in value:
        return value
    return re.sub(r"\\[\\\"n]", lambda m: _UNESCAPE[m.group(0)], value)


class Scraper:
    """Fetches `<url>/metrics` and `<url>/health` with an optional bearer key."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._clock = clock
        self._wall_clock = wall_clock

    def scrape(self) -> Scrape:
        """Take one scrape; raise ScrapeError when /metrics cannot be read."""
        at, wall = self._clock(), self._wall_clock()
        text = self._get("/metrics").decode("utf-8", errors="replace")
        try:
            self._get("/health")
            healthy = True
        except ScrapeError:
            healthy = False
        return Scrape(at=at, wall=wall, samples=parse_metrics(text), healthy=healthy)

    def _get(self, path: str) -> bytes:
        request = urllib.request.Request(self.url + path, headers=self._headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body: bytes = response.read()
                return body
        except urllib.error.HTTPError as exc:
            hint = (
                " (an admin key: --api-key or $LLMSERVE_API_KEY)" if exc.code in (401, 403) else ""
            )
            raise ScrapeError(f"{path}: HTTP {exc.code}{hint}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise ScrapeError(f"{self.url}: {reason}") from None
