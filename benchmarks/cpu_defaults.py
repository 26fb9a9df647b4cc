"""llmserve's default engine settings on CPU against `vllm serve`'s, on the same model and load.

    .venv/bin/python benchmarks/cpu_defaults.py [--emulate-avx2] [--setups NAME,...]
        [--num-prompts 48] [--concurrency 16] [--single 6]

Setups, each started, measured and stopped in turn (they share the CPU, never at once):

- `vllm-default`: `vllm serve MODEL --max-model-len 2048 --max-num-seqs 16` with
  `VLLM_CPU_KVCACHE_SPACE=1` (with nothing else set it wants 92% of a NUMA node's memory and
  does not start on a 24 GiB machine): the checkpoint's dtype, torch.compile, vLLM's defaults.
- `vllm-f32-eager`: the same with `--dtype float32 --enforce-eager` (the best flags measured on
  a CPU without native bfloat16, issue 15).
- `vllm-f32-compile`: `--dtype float32`, torch.compile (vLLM's default mode).
- `llmserve`: `llmserve up` on the shipped `llmserve.yaml` (only the port, the key store and
  state paths changed), with an API key: what `scripts/up` serves.
- `llmserve-compile`: the same with `engine.options: {enforce_eager: false}` (torch.compile).

A setup may be named twice (`vllm-f32-compile,vllm-f32-compile`): with `--cold-compile` the
first start compiles from scratch and the second finds vLLM's compile cache.

`--emulate-avx2` runs every server with `ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`:
PyTorch's CPU kernels then use AVX2 only, as on a CPU without AVX-512 and native bfloat16
(a bfloat16 linear layer runs 3.6x slower than float32 there, against 3.5x measured on a real
AVX2 machine). llmserve's `dtype: auto` reads the same variable. A `sitecustomize` on the
servers' PYTHONPATH also makes PyTorch's feature probes deny AMX and AVX-512 BF16: vLLM asks
them to choose its own bfloat16 kernels, and its AMX kernels die under the cap ("BFloat16
Brgemm VNNI format is only supported ... when `amx` is supported"). vLLM's other compiled
kernels keep AVX-512, so the emulation, if anything, favours `vllm serve`.

For each: seconds from start to ready, then `vllm bench serve` (random 128 in / 64 out) with
`--concurrency` streams, then with one stream (`--single` prompts). Needs SmolLM2
(`llmserve models prepare`) and a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.compare_vllm_bench import VLLM_CLI  # noqa: E402
from benchmarks.vs_vllm_serve import wait_ready  # noqa: E402
from tests.support.process import free_port, kill_group  # noqa: E402

MODEL = ROOT / "models" / "smollm2-135m-instruct"
COMMON = ["--served-model-name", "smollm2", "--max-model-len", "2048", "--max-num-seqs", "16"]
SETUPS: dict[str, list[str]] = {
    "vllm-default": [],
    "vllm-f32-eager": ["--dtype", "float32", "--enforce-eager"],
    "vllm-f32-compile": ["--dtype", "float32"],
    "llmserve": [],
    "llmserve-compile": [],
}
COMPILE_CACHE = Path.home() / ".cache" / "vllm" / "torch_compile_cache"
BASE_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
# Loaded by every Python process of a server under `--emulate-avx2` (PYTHONPATH): PyTorch's
# CPU feature probes, which vLLM asks before choosing its own kernels, then answer as on a CPU
# without AMX or AVX-512 BF16.
HIDE_BF16_SITECUSTOMIZE = """\
import torch.cpu
torch.cpu._is_amx_tile_supported = lambda: False
torch.cpu._is_amx_fp16_supported = lambda: False
torch.cpu._is_avx512_bf16_supported = lambda: False
"""


def bench(port: int, key: str | None, env: dict[str, str], workdir: Path, name: str,
          prompts: int, concurrency: int) -> dict:  # fmt: skip
    command = [
        sys.executable, "-c", VLLM_CLI, "bench", "serve", "--backend", "openai",
        "--base-url", f"http://127.0.0.1:{port}", "--endpoint", "/v1/completions",
        "--model", "smollm2", "--tokenizer", str(MODEL), "--dataset-name", "random",
        "--ignore-eos", "--random-input-len", "128", "--random-output-len", "64",
        "--num-prompts", str(prompts), "--max-concurrency", str(concurrency),
        "--seed", "0", "--save-result", "--result-dir", str(workdir),
        "--result-filename", f"{name}.json", "--percentile-metrics", "ttft,tpot,e2el",
        "--metric-percentiles", "50,99",
    ]  # fmt: skip
    bench_env = {**os.environ, **BASE_ENV, **env}
    if key:
        bench_env["OPENAI_API_KEY"] = key
    subprocess.run(command, env=bench_env, check=True, stdout=subprocess.DEVNULL, timeout=3600)
    return json.loads((workdir / f"{name}.json").read_text())


def llmserve_command(workdir: Path, port: int, env: dict[str, str],
                     compile: bool = False) -> tuple[list[str], str]:  # fmt: skip
    config = yaml.safe_load((ROOT / "llmserve.yaml").read_text())
    if compile:
        config["engine"]["options"] = {"enforce_eager": False}
    config["server"]["port"] = port
    config["server"]["public_ready"] = True
    config["engine"]["model"] = str(MODEL)
    config["auth"]["keys"] = str(workdir / "keys")
    config["limits"]["state_dir"] = str(workdir / "limits")
    # the load generator's key: a tier whose limits never refuse, the rest as shipped
    config["limits"]["tiers"]["bench"] = {"requests_per_minute": 100000,
                                          "tokens_per_minute": 100000000}  # fmt: skip
    config["usage"] = {"ledger": str(workdir / "usage.jsonl")}
    path = workdir / "llmserve.yaml"
    path.write_text(yaml.safe_dump(config))
    created = subprocess.run(
        [sys.executable, "-m", "llmserve", "keys", "create", "--name", "bench", "--tier",
         "bench", "-c", str(path)],
        capture_output=True, text=True, check=True, env={**os.environ, **env},
    )  # fmt: skip
    key = next(w for w in created.stdout.split() if w.startswith("sk-llms-"))
    return [sys.executable, "-m", "llmserve", "up", "-c", str(path)], key


def run_setup(name: str, args: argparse.Namespace, env: dict[str, str], workdir: Path) -> dict:
    port = free_port()
    key: str | None = None
    run_env = {**BASE_ENV, **env}
    if name.startswith("llmserve"):
        command, key = llmserve_command(workdir, port, env, compile=name == "llmserve-compile")
        ready = f"http://127.0.0.1:{port}/ready"
    else:
        command = [sys.executable, "-c", VLLM_CLI, "serve", str(MODEL), "--host", "127.0.0.1",
                   "--port", str(port), *COMMON, *SETUPS[name]]  # fmt: skip
        run_env["VLLM_CPU_KVCACHE_SPACE"] = "1"
        ready = f"http://127.0.0.1:{port}/v1/models"
    began = time.monotonic()
    with open(workdir / f"{name}.log", "wb") as log:
        proc = subprocess.Popen(command, env={**os.environ, **run_env}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        wait_ready(ready, key, proc, 900)
        started = time.monotonic() - began
        many = bench(port, key, env, workdir, f"{name}-many", args.num_prompts, args.concurrency)
        one = bench(port, key, env, workdir, f"{name}-one", args.single, 1)
    finally:
        kill_group(proc)
    dtype = _logged_dtype(workdir / f"{name}.log")
    return {"start_s": started, "many": many, "one": one, "dtype": dtype}


def _hide_bf16(tmp: Path) -> str:
    """A PYTHONPATH whose sitecustomize hides AMX and AVX-512 BF16 from PyTorch's probes."""
    site = tmp / "hide-bf16"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HIDE_BF16_SITECUSTOMIZE)
    return os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)


def _logged_dtype(log: Path) -> str:
    text = log.read_text(errors="replace")
    for marker in ("engine dtype on CPU: ", "dtype="):
        at = text.find(marker)
        if at >= 0:
            return text[at + len(marker) :].split("\n", 1)[0].split(",", 1)[0][:60]
    return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--emulate-avx2", action="store_true")
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--single", type=int, default=6, help="prompts of the 1-stream run")
    parser.add_argument("--cold-compile", action="store_true",
                        help=f"empty vLLM's compile cache ({COMPILE_CACHE}) first")  # fmt: skip
    args = parser.parse_args()
    env = dict(AVX2_ENV) if args.emulate_avx2 else {}
    names = [n for n in args.setups.split(",") if n]
    results: dict[str, dict] = {}
    if args.cold_compile:
        shutil.rmtree(COMPILE_CACHE, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.emulate_avx2:
            env["PYTHONPATH"] = _hide_bf16(Path(tmp))
        for i, name in enumerate(names):
            workdir = Path(tmp) / f"{i}-{name}"
            workdir.mkdir()
            results[name] = run_setup(name, args, env, workdir)
            _print_row(name, results[name], header=i == 0, args=args, env=env)
    if "llmserve" in results:
        ours = results["llmserve"]
        for name, r in results.items():
            if name != "llmserve":
                print(f"llmserve / {name}: output tok/s x"
                      f"{ours['many']['output_throughput'] / r['many']['output_throughput']:.2f}"
                      f" ({args.concurrency} streams), x"
                      f"{ours['one']['output_throughput'] / r['one']['output_throughput']:.2f}"
                      " (1 stream)")  # fmt: skip


def _print_row(name: str, r: dict, *, header: bool, args: argparse.Namespace,
               env: dict[str, str]) -> None:  # fmt: skip
    if header:
        flags = " ".join(f"{k}={v}" for k, v in env.items()) or "none"
        print(f"SmolLM2-135M, random 128 in / 64 out, {args.num_prompts} prompts at "
              f"{args.concurrency} streams, {args.single} at 1; emulation: {flags}")  # fmt: skip
        print(f"{'setup':<18} {'start s':>8} {'tok/s N':>8} {'TTFT p50 N':>11} "
              f"{'tok/s 1':>8}  dtype")  # fmt: skip
    many, one = r["many"], r["one"]
    failed = many["num_prompts"] - many["completed"]
    print(f"{name:<18} {r['start_s']:>8.1f} {many['output_throughput']:>8.1f} "
          f"{many['median_ttft_ms'] / 1000:>10.2f}s {one['output_throughput']:>8.1f}  "
          f"{r['dtype']}  failed={failed}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
