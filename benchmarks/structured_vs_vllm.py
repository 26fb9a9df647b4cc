"""Structured outputs: llmserve against a bare `vllm serve`, same model, same engine and
structured-output settings, same load, one server after the other in one run.

    .venv/bin/python benchmarks/structured_vs_vllm.py [--requests 96] [--repeats 2]

The load: chat requests with `response_format: json_schema` (20 bounded schemas in turn),
`max_tokens` 64, temperature 0, sent by the official `openai` client at a fixed concurrency.
llmserve runs the whole gateway (auth, a token-limited tier, admission queue, ledger); these
requests take its path through vLLM's own handlers. Prints output tokens/s and requests/s for
both and llmserve's ratio; with --repeats the servers alternate and the medians are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.compare_vllm_bench import VLLM_CLI  # noqa: E402
from benchmarks.vs_vllm_serve import (  # noqa: E402
    MODEL,
    VLLM_ENV,
    VLLM_SERVE_ARGS,
    llmserve_config,
    start,
    wait_ready,
)
from tests.engine.test_engine_openai_features import SCHEMAS  # noqa: E402
from tests.support.process import free_port, kill_group  # noqa: E402

# llmserve's default structured-output settings (engine.compact_json), given to vllm serve too
STRUCTURED = [
    "--structured-outputs-config",
    '{"backend": "xgrammar", "disable_any_whitespace": true}',
]


async def load(base_url: str, key: str, requests: int, concurrency: int) -> dict[str, float]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, timeout=600)
    tokens = 0
    failed = 0
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        nonlocal tokens, failed
        schema = SCHEMAS[i % len(SCHEMAS)]
        async with gate:
            try:
                response = await client.chat.completions.create(
                    model="smollm2", max_tokens=64, temperature=0,
                    messages=[{"role": "user", "content": f"Answer in JSON. Case {i}."}],
                    response_format={"type": "json_schema",
                                     "json_schema": {"name": f"s{i}", "schema": schema}},
                )  # fmt: skip
                tokens += response.usage.completion_tokens
            except Exception:
                failed += 1

    began = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(requests)))
    elapsed = time.perf_counter() - began
    await client.close()
    return {"output_tok_s": tokens / elapsed, "req_s": requests / elapsed, "failed": failed}


def run_vllm(args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    port = free_port()
    command = [sys.executable, "-c", VLLM_CLI, "serve", str(MODEL), "--host", "127.0.0.1",
               "--port", str(port), *VLLM_SERVE_ARGS, *STRUCTURED,
               "--dtype", args.dtype]  # fmt: skip
    proc = start(command, VLLM_ENV, port, workdir / "vllm.log")
    try:
        return asyncio.run(load(f"http://127.0.0.1:{port}", "none", args.requests,
                                args.concurrency))  # fmt: skip
    finally:
        kill_group(proc)


def run_llmserve(args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    port = free_port()
    config = llmserve_config(workdir, port)
    settings = json.loads(config.read_text())
    settings["engine"]["dtype"] = args.dtype
    config.write_text(json.dumps(settings))
    created = subprocess.run(
        [sys.executable, "-m", "llmserve", "keys", "create", "--name", "bench", "-c", str(config)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    key = next(w for w in created.stdout.split() if w.startswith("sk-llms-"))
    with open(workdir / "llmserve.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmserve", "up", "-c", str(config)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{port}/ready", key, proc)
        return asyncio.run(load(f"http://127.0.0.1:{port}", key, args.requests, args.concurrency))
    finally:
        kill_group(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="alternate the servers N times")
    parser.add_argument("--dtype", default="auto", help="for both servers")
    args = parser.parse_args()
    runs: list[dict[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            workdir = Path(tmp) / f"run{i}"
            workdir.mkdir()
            runs.append({"vllm serve": run_vllm(args, workdir),
                         "llmserve": run_llmserve(args, workdir)})  # fmt: skip
            report(runs[-1], f"run {i + 1} of {args.repeats}")
    if len(runs) > 1:
        medians = {
            name: {k: statistics.median(r[name][k] for r in runs) for k in runs[0][name]}
            for name in runs[0]
        }
        report(medians, f"median of {len(runs)} runs")


def report(results: dict[str, dict[str, float]], title: str) -> None:
    print(f"--- {title}: SmolLM2-135M, json_schema chat, max_tokens 64, same dtype for both")
    print(json.dumps(results))
    for name, r in results.items():
        print(f"{name:<12} {r['output_tok_s']:>9.1f} out tok/s {r['req_s']:>7.2f} req/s "
              f"failed={r['failed']:.0f}")  # fmt: skip
    ratio = results["llmserve"]["output_tok_s"] / results["vllm serve"]["output_tok_s"]
    print(f"llmserve / vllm serve: output tok/s x{ratio:.3f}")


if __name__ == "__main__":
    main()
