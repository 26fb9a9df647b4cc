"""LoRA adapters: llmserve against `vllm serve --lora-modules`, same model, adapters, engine
flags and load, the servers alternating (they share the CPU, so never at once).

    .venv/bin/python benchmarks/lora_vs_vllm.py [--num-prompts 96] [--concurrency 16]
        [--repeats 2]

Two rank-8 adapters (random q_proj/v_proj weights, tests/support/tiny_lora.py) are made for
SmolLM2 once, in ~/.cache/llmserve/bench-lora. llmserve serves them from `engine.lora.adapters`
on its shipped llmserve.yaml (a key of a tier that never refuses); `vllm serve` gets the
engine arguments llmserve gives vLLM (`vllm_args.build_launch`, as `vllm serve` flags) and the
same adapters as `--lora-modules`. The load: `llmserve bench`, random 128 tokens in / 64 out,
each request drawn among the base model and the two adapters (`--lora-modules`). Prints output
tokens/s and TTFT per run and the ratio. Needs SmolLM2 (`llmserve models prepare`) and a quiet
machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.compare_vllm_bench import VLLM_CLI  # noqa: E402
from benchmarks.vs_vllm_serve import wait_ready  # noqa: E402
from tests.support.process import free_port, kill_group  # noqa: E402
from tests.support.tiny_lora import build_tiny_lora  # noqa: E402

MODEL = ROOT / "models" / "smollm2-135m-instruct"
NAMES = ("smollm2", "lora-a", "lora-b")
CACHE = Path(os.environ.get("LLMSERVE_CACHE", Path.home() / ".cache" / "llmserve"))


def adapters() -> dict[str, str]:
    out = CACHE / "bench-lora"
    return {name: str(build_tiny_lora(out / name, MODEL, seed=seed))
            for seed, name in enumerate(NAMES[1:], start=1)}  # fmt: skip


def engine_section(paths: dict[str, str]) -> dict:
    engine = yaml.safe_load((ROOT / "llmserve.yaml").read_text())["engine"]
    engine.update(model=str(MODEL), lora={"adapters": paths})
    return engine


def vllm_command(paths: dict[str, str], port: int) -> tuple[list[str], dict[str, str]]:
    from llmserve.config import EngineConfig
    from llmserve.engine.vllm import _engine_arg_names
    from llmserve.engine.vllm_args import (
        build_launch,
        read_cpu_flags,
        read_mem_available,
        vllm_serve_command,
    )
    from llmserve.engine.vllm_lora import lora_module_args

    config = EngineConfig.model_validate(engine_section(paths))
    launch = build_launch(config, "cpu", _engine_arg_names(), read_cpu_flags(),
                          read_mem_available())  # fmt: skip
    args = dict(launch.engine_args)
    args.pop("structured_outputs_config", None)  # llmserve's JSON-whitespace setting: unused here
    command = vllm_serve_command(args, headless=False)[2:]  # after `vllm serve`
    command = [sys.executable, "-c", VLLM_CLI, "serve", *command, "--host", "127.0.0.1",
               "--port", str(port), *lora_module_args(config)]  # fmt: skip
    return command, {**launch.env, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}


def llmserve_command(paths: dict[str, str], port: int, workdir: Path) -> tuple[list[str], str]:
    config = yaml.safe_load((ROOT / "llmserve.yaml").read_text())
    config["server"].update(port=port, public_ready=True)
    config["engine"] = engine_section(paths)
    config["auth"]["keys"] = str(workdir / "keys")
    config["limits"]["state_dir"] = str(workdir / "limits")
    config["limits"]["tiers"]["bench"] = {"requests_per_minute": 100000,
                                          "tokens_per_minute": 100000000}  # fmt: skip
    config["usage"] = {"ledger": str(workdir / "usage.jsonl")}
    config["logging"]["level"] = "warning"
    path = workdir / "llmserve.yaml"
    path.write_text(yaml.safe_dump(config))
    created = subprocess.run(
        [sys.executable, "-m", "llmserve", "keys", "create", "--name", "bench", "--tier",
         "bench", "-c", str(path)], capture_output=True, text=True, check=True,
    )  # fmt: skip
    key = next(w for w in created.stdout.split() if w.startswith("sk-llms-"))
    return [sys.executable, "-m", "llmserve", "up", "-c", str(path)], key


def bench(port: int, key: str | None, args: argparse.Namespace, out: Path) -> dict:
    command = [
        sys.executable, "-m", "llmserve", "bench", "--base-url", f"http://127.0.0.1:{port}",
        "--lora-modules", ",".join(NAMES), "--model", NAMES[0], "--tokenizer", str(MODEL),
        "--dataset-name", "random", "--input-len", "128", "--output-len", "64", "--ignore-eos",
        "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.concurrency),
        "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name,
        "--disable-tqdm",
    ]  # fmt: skip
    env = {**os.environ, **({"OPENAI_API_KEY": key} if key else {})}
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, timeout=3600)
    return json.loads(out.read_text())


def run(server: str, paths: dict[str, str], args: argparse.Namespace, workdir: Path) -> dict:
    port = free_port()
    key: str | None = None
    if server == "llmserve":
        command, key = llmserve_command(paths, port, workdir)
        env: dict[str, str] = {}
        ready = f"http://127.0.0.1:{port}/ready"
    else:
        command, env = vllm_command(paths, port)
        ready = f"http://127.0.0.1:{port}/v1/models"
    with open(workdir / f"{server}.log", "wb") as log:
        proc = subprocess.Popen(command, env={**os.environ, **env}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        wait_ready(ready, key, proc)
        return bench(port, key, args, workdir / f"{server}.json")
    finally:
        kill_group(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-prompts", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="alternate the servers N times")
    args = parser.parse_args()
    paths = adapters()
    ratios: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            rows = {}
            for server in ("vllm serve", "llmserve") if i % 2 == 0 else ("llmserve", "vllm serve"):
                workdir = Path(tmp) / f"{i}-{server.replace(' ', '-')}"
                workdir.mkdir()
                rows[server] = run(server, paths, args, workdir)
                r = rows[server]
                print(f"run {i + 1} {server:<11} out tok/s {r['output_throughput']:7.1f}  "
                      f"TTFT p50 {r['median_ttft_ms']:7.0f} ms  p99 {r['p99_ttft_ms']:7.0f} ms  "
                      f"failed {r['num_prompts'] - r['completed']}", flush=True)  # fmt: skip
            ratio = rows["llmserve"]["output_throughput"] / rows["vllm serve"]["output_throughput"]
            ratios.append(ratio)
            print(f"run {i + 1}: llmserve / vllm serve output tok/s x{ratio:.3f}", flush=True)
    print(f"median x{statistics.median(ratios):.3f} over {len(ratios)} runs (target: within 5%)")


if __name__ == "__main__":
    main()
