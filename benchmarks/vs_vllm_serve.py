"""llmserve against a bare `vllm serve` on the same model, the same engine settings and the same
load from `vllm bench serve`, one after the other in one run (they share the CPU, so never at once).

    .venv/bin/python benchmarks/vs_vllm_serve.py [--num-prompts 200] [--concurrency 16]

Needs the SmolLM2 model (`llmserve models prepare`). Prints output tokens/s, request throughput
and TTFT p50/p99 for both servers and llmserve's ratio to vLLM. llmserve runs with auth on (one
key), a token-limited tier (limits high enough never to refuse) and the admission queue: the
whole gateway, as in production.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.compare_vllm_bench import VLLM_CLI  # noqa: E402
from tests.support.process import free_port, kill_group, wait_http  # noqa: E402

MODEL = ROOT / "models" / "smollm2-135m-instruct"
# The engine settings llmserve uses on CPU (llmserve/engine/vllm_args.py), given to vllm serve.
VLLM_SERVE_ARGS = [
    "--served-model-name", "smollm2", "--max-model-len", "2048", "--max-num-seqs", "16",
    "--enforce-eager", "--distributed-executor-backend", "uni", "--no-enable-chunked-prefill",
    "--max-num-batched-tokens", "2048", "--kv-cache-memory-bytes", str(1024**3),
]  # fmt: skip
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1"}  # fmt: skip


def start(command: list[str], env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, env={**os.environ, **env}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", 600, proc)
    except BaseException:
        kill_group(proc)
        raise
    return proc


def bench(port: int, args: argparse.Namespace, workdir: Path, name: str, key: str | None) -> dict:
    command = [
        sys.executable, "-c", VLLM_CLI, "bench", "serve", "--backend", "openai",
        "--base-url", f"http://127.0.0.1:{port}", "--endpoint", "/v1/completions",
        "--model", "smollm2", "--tokenizer", str(MODEL), "--dataset-name", "random",
        "--ignore-eos",
        "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
        "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.concurrency),
        "--seed", "0", "--save-result", "--result-dir", str(workdir),
        "--result-filename", f"{name}.json", "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", "50,99",
    ]  # fmt: skip
    env = {**os.environ, **VLLM_ENV}
    if key:
        env["OPENAI_API_KEY"] = key
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, timeout=3600)
    return json.loads((workdir / f"{name}.json").read_text())


def llmserve_config(workdir: Path, port: int) -> Path:
    config = {
        "server": {"host": "127.0.0.1", "port": port, "public_ready": True},
        "engine": {"model": str(MODEL), "served_model_name": "smollm2", "max_model_len": 2048,
                   "max_num_seqs": 16},
        "auth": {"keys": str(workdir / "keys")},
        "limits": {"state_dir": str(workdir / "limits"), "default_tier": "bench",
                   "tiers": {"bench": {"requests_per_minute": 100000,
                                       "tokens_per_minute": 100000000}}},
        "usage": {"ledger": str(workdir / "usage.jsonl")},
        "logging": {"level": "warning"},
    }  # fmt: skip
    path = workdir / "llmserve.yaml"
    path.write_text(json.dumps(config))
    return path


def run_llmserve(args: argparse.Namespace, workdir: Path) -> dict:
    port = free_port()
    config = llmserve_config(workdir, port)
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
        return bench(port, args, workdir, "llmserve", key)
    finally:
        kill_group(proc)


def wait_ready(url: str, key: str | None, proc: subprocess.Popen, timeout: float = 600) -> None:
    """Until `url` answers 200 (with `key` as bearer token, if any); raise if `proc` exits."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    request = urllib.request.Request(url, headers=headers)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(request, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def run_vllm(args: argparse.Namespace, workdir: Path) -> dict:
    port = free_port()
    command = [sys.executable, "-c", VLLM_CLI, "serve", str(MODEL), "--host", "127.0.0.1",
               "--port", str(port), *VLLM_SERVE_ARGS]  # fmt: skip
    proc = start(command, VLLM_ENV, port, workdir / "vllm.log")
    try:
        return bench(port, args, workdir, "vllm", None)
    finally:
        kill_group(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="alternate the servers N times")
    args = parser.parse_args()
    runs: list[dict[str, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for i in range(args.repeats):
            run_dir = workdir / f"run{i}"
            run_dir.mkdir()
            runs.append({"vllm serve": run_vllm(args, run_dir),
                         "llmserve": run_llmserve(args, run_dir)})  # fmt: skip
    for i, results in enumerate(runs, 1):
        print(f"--- run {i} of {len(runs)}")
        report(results, args)
    if len(runs) > 1:
        print(f"--- median over {len(runs)} runs")
        report({name: _median_result([r[name] for r in runs]) for name in runs[0]}, args)


def _median_result(results: list[dict]) -> dict:
    keys = ("output_throughput", "request_throughput", "median_ttft_ms", "p99_ttft_ms")
    merged = dict(results[0])
    for key in keys:
        merged[key] = statistics.median(r[key] for r in results)
    return merged


def report(results: dict[str, dict], args: argparse.Namespace) -> None:
    print(
        f"SmolLM2-135M, random {args.input_len} in / {args.output_len} out, {args.num_prompts} "
        f"prompts, concurrency {args.concurrency}, load from `vllm bench serve`"
    )
    print(f"{'server':<12} {'out tok/s':>10} {'req/s':>7} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12}")
    for name, r in results.items():
        print(
            f"{name:<12} {r['output_throughput']:>10.1f} {r['request_throughput']:>7.2f} "
            f"{r['median_ttft_ms']:>12.1f} {r['p99_ttft_ms']:>12.1f}  "
            f"failed={r['num_prompts'] - r['completed']}"
        )
    ours, theirs = results["llmserve"], results["vllm serve"]
    tokens = ours["output_throughput"] / theirs["output_throughput"]
    ttft = ours["p99_ttft_ms"] / theirs["p99_ttft_ms"]
    print(f"llmserve / vllm serve: output tok/s x{tokens:.3f}, TTFT p99 x{ttft:.3f}")


if __name__ == "__main__":
    main()
