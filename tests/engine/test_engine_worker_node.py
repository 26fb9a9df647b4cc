"""An engine over two "nodes" on this one machine, vLLM's multiprocess way: `llmserve up` (the
head, data-parallel rank 0) and `llmserve worker --node-rank 1` (vLLM's headless mode, rank 1),
from one config file, both on 127.0.0.1, with the tiny model on vLLM's CPU backend. What a
second machine would add (the network, another host's model copy) is not tested here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.process import free_port, group_members, kill_group, wait_http

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_SECONDS = 150  # about 35 s on an idle 2-core machine


def test_the_worker_runs_vllm_serve_headless_with_the_heads_engine_args(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs

    from llmserve.engine.vllm import _engine_arg_names, _engine_arg_objects
    from llmserve.engine.vllm_args import build_launch, build_worker_launch
    from llmserve.engine.vllm_worker import _serve_namespace
    from tests.engine.conftest import tiny_engine_config

    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)  # set by vLLM's CLI setup
    nodes = {"nnodes": 2, "master_addr": "10.0.0.1"}
    head_config = tiny_engine_config(tiny_model_dir, data_parallel_size=2, nodes=nodes)
    worker_config = tiny_engine_config(tiny_model_dir, data_parallel_size=2,
                                       nodes={**nodes, "node_rank": 1})  # fmt: skip
    known = _engine_arg_names()
    head_args = build_launch(head_config, "cpu", known).engine_args
    head = AsyncEngineArgs(**_engine_arg_objects(head_args))
    args = _serve_namespace(build_worker_launch(worker_config, "cpu", known).engine_args)
    assert args.headless is True
    assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    worker = AsyncEngineArgs.from_cli_args(args)
    differ = {f.name: (getattr(head, f.name), getattr(worker, f.name))
              for f in dataclasses.fields(AsyncEngineArgs)
              if getattr(head, f.name) != getattr(worker, f.name)}  # fmt: skip
    # vLLM's CLI defaults these differently from AsyncEngineArgs; none matters to the engine
    # (a new one here: check it, then add it)
    cli_defaults = {"mm_device_do_normalize", "enable_lora", "reasoning_parser_plugin"}
    assert differ.pop("node_rank") == (0, 1)
    assert set(differ) <= cli_defaults, differ


def test_the_logged_vllm_serve_command_parses_to_the_same_engine_args() -> None:
    """benchmarks/gpu_check.sh runs this command for its bare `vllm serve` comparison."""
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from llmserve.config import load_config
    from llmserve.engine.vllm import _engine_arg_names, _engine_arg_objects
    from llmserve.engine.vllm_args import build_launch, vllm_serve_command

    engine = load_config(ROOT / "examples" / "gpu-qwen2.5-7b.yaml").engine
    launch = build_launch(engine, "cuda", _engine_arg_names())
    parser = FlexibleArgumentParser(prog="vllm")
    ServeSubcommand().subparser_init(parser.add_subparsers(dest="subparser"))
    args = parser.parse_args(vllm_serve_command(launch.engine_args, headless=False)[1:])
    args.model = args.model_tag  # what `vllm serve` does with its positional model
    parsed = AsyncEngineArgs.from_cli_args(args)
    direct = AsyncEngineArgs(**_engine_arg_objects(launch.engine_args))
    set_here = {name for name in launch.engine_args if name != "served_model_name"}
    differ = {name: (getattr(parsed, name), getattr(direct, name)) for name in set_here
              if getattr(parsed, name) != getattr(direct, name)}  # fmt: skip
    assert differ == {}
    assert parsed.served_model_name == [direct.served_model_name]
    assert {f.name for f in dataclasses.fields(AsyncEngineArgs)} >= set(launch.engine_args)


def _start(command: list[str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                start_new_session=True)  # fmt: skip


def _complete(base_url: str, i: int) -> dict:
    body = json.dumps({"model": "tiny", "prompt": f"Once upon a time {i}", "max_tokens": 24,
                       "ignore_eos": True}).encode()  # fmt: skip
    request = urllib.request.Request(base_url + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _successes_per_engine(metrics: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith("vllm:request_success_total{"):
            engine = line.split('engine="', 1)[1].split('"', 1)[0]
            counts[engine] = counts.get(engine, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def _write_config(tmp_path: Path, model: Path, port: int, admin: int) -> Path:
    config = tmp_path / "llmserve.yaml"
    config.write_text(f"""
server: {{host: 127.0.0.1, port: {port}, admin_port: {admin}, public_ready: true,
          shutdown_grace_seconds: 5}}
engine:
  model: {model}
  served_model_name: tiny
  max_model_len: 512
  max_num_seqs: 2
  cpu_kv_cache_bytes: 128MiB
  data_parallel_size: 2
  nodes: {{nnodes: 2, master_addr: 127.0.0.1, master_port: {free_port()},
           data_parallel_rpc_port: {free_port()}, heartbeat_port: {free_port()}}}
auth: {{enabled: false}}
usage: {{ledger: null}}
""")
    return config


def _logs(tmp_path: Path) -> str:
    return "\n".join(
        f"--- {log.name} ---\n" + log.read_text(errors="replace")[-4000:]
        for log in sorted(tmp_path.glob("*.log"))
    )


def _wait_ready(url: str, procs: list[subprocess.Popen[bytes]], tmp_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        for proc in procs:
            assert proc.poll() is None, f"{proc.args} exited {proc.returncode}\n{_logs(tmp_path)}"
        try:
            wait_http(url, 1)
            return
        except TimeoutError:
            continue
    raise AssertionError(f"{url} not ready in {START_TIMEOUT_SECONDS} s\n{_logs(tmp_path)}")


def _wait_for(text: str, log: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        assert proc.poll() is None, f"exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"no {text!r} in {timeout} s"
        time.sleep(0.2)


def _wait_gone(pgid: int, timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return group_members(pgid)


LLMSERVE = [sys.executable, "-m", "llmserve"]


def test_a_head_and_a_worker_node_serve_requests_on_both_ranks_and_stop_cleanly(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    port, admin = free_port(), free_port()
    config = _write_config(tmp_path, tiny_model_dir, port, admin)
    worker = _start([*LLMSERVE, "worker", "-c", str(config), "--node-rank", "1"],
                    tmp_path / "worker.log", tmp_path)  # fmt: skip
    head = _start([*LLMSERVE, "up", "-c", str(config)], tmp_path / "head.log", tmp_path)
    try:
        _wait_ready(f"http://127.0.0.1:{port}/ready", [head, worker], tmp_path)
        worker_log = (tmp_path / "worker.log").read_text()
        assert "node 1 of 2: vLLM headless engine(s) for data-parallel rank(s) 1 of 2" in worker_log
        assert "llmserve worker runs: VLLM_ENABLE_V1_MULTIPROCESSING=0 vllm serve" in worker_log

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda i: _complete(f"http://127.0.0.1:{port}", i), range(6)))
        assert [a["usage"]["completion_tokens"] for a in answers] == [24] * 6
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as resp:
            served = _successes_per_engine(resp.read().decode())
        assert served.get("0", 0) >= 1 and served.get("1", 0) >= 1, served  # both ranks ran
        assert sum(served.values()) == 6

        # A request in flight on each rank while the worker node stops
        started = threading.Semaphore(0)
        with ThreadPoolExecutor(2) as pool:
            long = [pool.submit(_stream_outcome, f"http://127.0.0.1:{port}", i, started)
                    for i in range(2)]  # fmt: skip
            for _ in long:
                assert started.acquire(timeout=30), "no first token"
            # SIGTERM stops the worker node: exit 0, none of its processes left
            os.kill(worker.pid, signal.SIGTERM)
            assert worker.wait(30) == 0, _logs(tmp_path)
            assert _wait_gone(worker.pid) == [], _logs(tmp_path)
            assert "llmserve worker: stopped" in (tmp_path / "worker.log").read_text()
            # the head notices (the worker's heartbeat connection closed): what the dead rank
            # ran ends with an error instead of hanging, and the head exits 1 for a restart
            outcomes = [f.result(timeout=30) for f in long]
        assert head.wait(30) == 1, _logs(tmp_path)
        head_log = (tmp_path / "head.log").read_text()
        assert "worker heartbeats: node 1 (data-parallel rank 1) joined" in head_log
        assert "node 1 (data-parallel rank 1) closed its connection" in head_log
        # rank 1's request ends with an error, never passed off as complete or cut silently:
        # `engine_error` when vLLM's worker aborted it while stopping, before the heartbeat
        # closed; `engine_unavailable` when the head's abort came first
        assert any(o != "complete" for o in outcomes), outcomes
        assert all(o in ("complete", "engine_unavailable", "engine_error") for o in outcomes), (
            outcomes
        )
        assert _wait_gone(head.pid) == [], _logs(tmp_path)
    finally:
        kill_group(worker)
        kill_group(head)


def _stream_outcome(base_url: str, i: int, started: threading.Semaphore) -> str:
    """Stream a long completion: `complete`, `cut` (ended without a finish), or the error code
    of its error event or status."""
    body = json.dumps({"model": "tiny", "prompt": f"Long story {i}", "max_tokens": 480,
                       "ignore_eos": True, "stream": True}).encode()  # fmt: skip
    request = urllib.request.Request(base_url + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            first = True
            for line in response:
                if not line.startswith(b"data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return str(event["error"]["code"])
                if first:
                    started.release()
                    first = False
                if event["choices"] and event["choices"][0].get("finish_reason"):
                    return "complete"
    except urllib.error.HTTPError as exc:
        return str(json.loads(exc.read())["error"]["code"])
    return "cut"


def test_a_worker_whose_head_goes_away_stops_its_engine_and_exits_1(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """vLLM's headless engine would wait for a head that is gone for good; the worker's watch of
    the head's API port stops it, for its supervisor to start it again beside the next head."""
    import socket

    config = _write_config(tmp_path, tiny_model_dir, free_port(), free_port())
    api = socket.socket()  # stands for the head's API port
    api.bind(("127.0.0.1", 0))
    api.listen()
    head = f"127.0.0.1:{api.getsockname()[1]}"
    log = tmp_path / "worker.log"
    worker = _start([*LLMSERVE, "worker", "-c", str(config), "--node-rank", "1", "--head", head],
                    log, tmp_path)  # fmt: skip
    try:
        _wait_for("the head accepts at", log, worker, 60)
        # vLLM's headless mode is running (its SIGTERM handler is in place): the head goes away
        _wait_for("in headless mode", log, worker, START_TIMEOUT_SECONDS)
        api.close()
        assert worker.wait(30) == 1, _logs(tmp_path)
        assert _wait_gone(worker.pid) == [], _logs(tmp_path)
        assert f"the head ({head}) is gone: stopping this worker (exit 1)" in log.read_text()
    finally:
        api.close()
        kill_group(worker)


def test_a_head_stopped_while_it_waits_for_its_workers_exits_at_once(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """vLLM's start-up waits up to 600 s for the engines of the other nodes; a SIGTERM then ends
    the head within seconds, leaving none of its processes."""
    config = _write_config(tmp_path, tiny_model_dir, free_port(), free_port())
    log = tmp_path / "head.log"
    head = _start([*LLMSERVE, "up", "-c", str(config)], log, tmp_path)
    try:
        _wait_for("Waiting for READY message from DP Coordinator", log, head, START_TIMEOUT_SECONDS)
        stopped = time.monotonic()
        os.kill(head.pid, signal.SIGTERM)
        assert head.wait(30) == 0, _logs(tmp_path)
        assert time.monotonic() - stopped < 15, _logs(tmp_path)
        assert _wait_gone(head.pid) == [], _logs(tmp_path)
    finally:
        kill_group(head)
