"""Overload: llmserve's default admission against a bare `vllm serve`, same model and engine
flags, one after the other in one run (they share the CPU, so never at once).

    .venv/bin/python benchmarks/overload.py [--requests 60] [--factor 2]

1. Capacity: `vllm serve` under a closed loop of 16 streams (requests per second it sustains).
2. Overload: Poisson arrivals at `factor` x capacity, the same seeded schedule against both
   servers; llmserve runs its shipped llmserve.yaml (a `pro` key). Prints, per server, the
   requests served and refused, goodput (served with TTFT <= --slo, per second of the run),
   TTFT p50/p99 of the served, and how fast refusals came (p99).
3. Tiers: llmserve with the shipped tiers (free: priority 0, pro: 10; free's limits lifted so
   that only admission stands in its way): the TTFT of a trickle of `pro` requests
   (`--trickle` of them, Poisson at `--trickle-rate` per second) on an idle server, then
   while `free` floods at `--flood` x capacity.

Needs the SmolLM2 model (`llmserve models prepare`). Every request: a 128-token prompt, 64
tokens out (ignore_eos), streamed from /v1/completions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.compare_vllm_bench import VLLM_CLI  # noqa: E402
from benchmarks.vs_vllm_serve import MODEL, VLLM_ENV, VLLM_SERVE_ARGS, start, wait_ready  # noqa: E402
from tests.support.process import free_port, kill_group  # noqa: E402

WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "every",
         "engine", "counts", "tokens")


@dataclass
class Outcome:
    arrived: float
    status: int
    ttft: float | None = None  # seconds from sending to the first token
    answered: float | None = None  # seconds from sending to a refusal's status line
    tier: str = ""


def prompt(seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(120))  # about 128 tokens with SmolLM2


async def one(session: aiohttp.ClientSession, url: str, key: str | None, seed: int,
              arrived: float, tier: str = "") -> Outcome:  # fmt: skip
    body = {"model": "smollm2", "prompt": prompt(seed), "max_tokens": 64, "stream": True,
            "ignore_eos": True, "temperature": 0}  # fmt: skip
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    sent = time.monotonic()
    async with session.post(url + "/v1/completions", json=body, headers=headers) as resp:
        if resp.status != 200:
            await resp.read()
            return Outcome(arrived, resp.status, answered=time.monotonic() - sent, tier=tier)
        ttft = None
        async for line in resp.content:
            if ttft is None and line.startswith(b"data: {") and b'"text":""' not in line:
                ttft = time.monotonic() - sent
        return Outcome(arrived, 200, ttft=ttft, tier=tier)


async def poisson(url: str, key: str | None, rate: float, count: int, seed: int,
                  tier: str = "") -> list[Outcome]:  # fmt: skip
    rng = random.Random(seed)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks, at = [], 0.0
        start_at = time.monotonic()
        for i in range(count):
            at += rng.expovariate(rate)
            delay = start_at + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(session, url, key, seed * 1000 + i, at, tier)))
        return list(await asyncio.gather(*tasks))


async def closed_loop(url: str, key: str | None, streams: int, count: int) -> float:
    """Requests per second sustained by `streams` clients sending back to back."""
    left = list(range(count))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def client() -> None:
            while left:
                await one(session, url, key, left.pop(), 0.0)

        began = time.monotonic()
        await asyncio.gather(*(client() for _ in range(streams)))
        return count / (time.monotonic() - began)


def summary(name: str, outcomes: list[Outcome], slo: float) -> dict[str, float]:
    served = [o for o in outcomes if o.status == 200 and o.ttft is not None]
    refused = [o for o in outcomes if o.status != 200]
    duration = max(o.arrived for o in outcomes) + max((o.ttft or 0) for o in outcomes)
    good = [o for o in served if o.ttft is not None and o.ttft <= slo]
    ttfts = sorted(o.ttft for o in served if o.ttft is not None)
    answers = sorted(o.answered for o in refused if o.answered is not None)
    row = {
        "served": len(served), "refused": len(refused), "goodput": len(good) / duration,
        "ttft_p50": _pct(ttfts, 50), "ttft_p99": _pct(ttfts, 99),
        "refusal_p99_ms": 1000 * _pct(answers, 99) if answers else float("nan"),
    }  # fmt: skip
    print(f"{name:<12} served {row['served']:>3}  refused {row['refused']:>3}  goodput "
          f"{row['goodput']:.3f} req/s  TTFT p50 {row['ttft_p50']:.2f} s  p99 "
          f"{row['ttft_p99']:.2f} s  refusals answered p99 {row['refusal_p99_ms']:.0f} ms",
          flush=True)  # fmt: skip
    return row


def _pct(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(pct) - 1]


def llmserve_default_config(workdir: Path, port: int, lift_free: bool, queue: dict | None = None,
                            engine_options: dict | None = None) -> Path:  # fmt: skip
    config = yaml.safe_load((ROOT / "llmserve.yaml").read_text())
    server = {"host": "127.0.0.1", "port": port, "public_ready": True}
    config.setdefault("server", {}).update(server)
    config["engine"]["model"] = str(MODEL)
    config["auth"]["keys"] = str(workdir / "keys")
    config.setdefault("limits", {})["state_dir"] = str(workdir / "limits")
    config["usage"] = {"ledger": str(workdir / "usage.jsonl")}
    config.setdefault("logging", {})["level"] = "warning"
    if lift_free:
        config["limits"]["tiers"]["free"] = {"priority": 0}
    config.setdefault("queue", {}).update(queue or {})
    if engine_options:
        config["engine"].setdefault("options", {}).update(engine_options)
    path = workdir / "llmserve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def create_key(config: Path, tier: str) -> str:
    created = subprocess.run(
        [sys.executable, "-m", "llmserve", "keys", "create", "--name", tier, "--tier", tier,
         "-c", str(config)], capture_output=True, text=True, check=True,
    )  # fmt: skip
    return next(w for w in created.stdout.split() if w.startswith("sk-llms-"))


def start_llmserve(
    workdir: Path, lift_free: bool, queue: dict | None = None, engine_options: dict | None = None
) -> tuple[subprocess.Popen, str, dict]:
    port = free_port()
    config = llmserve_default_config(workdir, port, lift_free, queue, engine_options)
    keys = {tier: create_key(config, tier) for tier in ("pro", "free")}
    with open(workdir / "llmserve.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "llmserve", "up", "-c", str(config)],
                                stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    wait_ready(f"http://127.0.0.1:{port}/ready", keys["pro"], proc)
    return proc, f"http://127.0.0.1:{port}", keys


async def tiers_run(url: str, keys: dict, capacity: float, args: argparse.Namespace) -> None:
    rate = args.trickle_rate
    idle = await poisson(url, keys["pro"], rate, args.trickle, seed=7, tier="pro")
    idle_row = summary("pro, idle", idle, args.slo)
    flood_count = int(args.flood * capacity * args.trickle / rate)
    flood, trickle = await asyncio.gather(
        poisson(url, keys["free"], args.flood * capacity, flood_count, seed=8, tier="free"),
        poisson(url, keys["pro"], rate, args.trickle, seed=7, tier="pro"),
    )
    summary("free, flood", flood, args.slo)
    busy_row = summary("pro, flood", trickle, args.slo)
    print(f"pro TTFT p99 under the flood / idle: {busy_row['ttft_p99'] / idle_row['ttft_p99']:.2f}"
          " (target <= 1.5)", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--factor", type=float, default=2.0, help="arrivals / capacity")
    parser.add_argument("--flood", type=float, default=3.0, help="free's flood / capacity")
    parser.add_argument("--trickle", type=int, default=60, help="pro requests in the tier run")
    parser.add_argument("--trickle-rate", type=float, default=1.0, help="pro requests/s")
    parser.add_argument("--slo", type=float, default=10.0, help="goodput: TTFT <= this (s)")
    parser.add_argument("--capacity", type=float, help="requests/s (default: measure it)")
    parser.add_argument("--only", choices=("goodput", "tiers"), help="run one part")
    parser.add_argument("--reserved-share", type=float, help="queue.reserved_share (tiers)")
    parser.add_argument("--lower-prefills", help="queue.lower_prefills (tiers): N, auto, null")
    args = parser.parse_args()
    if args.only == "tiers":
        if not args.capacity:
            parser.error("--only tiers needs --capacity")
        tiers_only(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        port = free_port()
        command = [sys.executable, "-c", VLLM_CLI, "serve", str(MODEL), "--host", "127.0.0.1",
                   "--port", str(port), *VLLM_SERVE_ARGS]  # fmt: skip
        vllm = start(command, VLLM_ENV, port, workdir / "vllm.log")
        url = f"http://127.0.0.1:{port}"
        try:
            capacity = args.capacity or asyncio.run(closed_loop(url, None, 16, 48))
            rate = args.factor * capacity
            print(f"capacity {capacity:.2f} req/s (vllm serve, 16 streams); arrivals at "
                  f"{rate:.2f} req/s, {args.requests} requests", flush=True)  # fmt: skip
            vllm_row = summary("vllm serve", asyncio.run(
                poisson(url, None, rate, args.requests, seed=1)), args.slo)  # fmt: skip
        finally:
            kill_group(vllm)
        (workdir / "a").mkdir()
        proc, url, keys = start_llmserve(workdir / "a", lift_free=False)
        try:
            ours = summary("llmserve", asyncio.run(
                poisson(url, keys["pro"], rate, args.requests, seed=1)), args.slo)  # fmt: skip
        finally:
            kill_group(proc)
        print(f"goodput llmserve / vllm serve: {ours['goodput'] / vllm_row['goodput']:.2f} "
              "(target >= 3)", flush=True)  # fmt: skip
        if args.only != "goodput":
            run_tiers(workdir / "b", capacity, args)
    print(json.dumps({"capacity": capacity, "rate": rate}), flush=True)


def tiers_only(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run_tiers(Path(tmp), args.capacity, args)


def run_tiers(workdir: Path, capacity: float, args: argparse.Namespace) -> None:
    workdir.mkdir(exist_ok=True)
    queue = {} if args.reserved_share is None else {"reserved_share": args.reserved_share}
    if args.lower_prefills is not None:
        queue["lower_prefills"] = yaml.safe_load(args.lower_prefills)
    proc, url, keys = start_llmserve(workdir, lift_free=True, queue=queue)
    try:
        asyncio.run(tiers_run(url, keys, capacity, args))
    finally:
        kill_group(proc)


if __name__ == "__main__":
    main()
