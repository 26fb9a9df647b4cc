"""`llmserve worker`: its help, and config errors that stop it (exit 2) before vLLM is imported.
The real worker beside a real head: tests/engine/test_engine_worker_node.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmserve.cli.main import app

runner = CliRunner()

TWO_NODES = """
engine:
  model: {model}
  data_parallel_size: 2
  nodes: {nnodes: 2, master_addr: 127.0.0.1}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "llmserve.yaml"
    path.write_text(text.replace("{model}", str(tmp_path)))
    return path


def test_help_names_every_option() -> None:
    result = runner.invoke(app, ["worker", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--config", "--node-rank", "--data-parallel-start-rank",
                   "--data-parallel-size-local", "--model", "--head"):  # fmt: skip
        assert option in result.output
    assert "headless" in result.output


@pytest.mark.parametrize(
    ("text", "args", "message"),
    [
        ("engine: {nodes: {nnodes: 2}}\n", [], "engine: nodes.master_addr: set the head"),
        ("engine: {kind: magic}\n", [], "engine.kind: expected 'vllm' or 'fake'"),
        ("engine: {data_parallel_size: 2}\n", [], "this config runs on one node"),
        (TWO_NODES, [], "node_rank is 0, the head (`llmserve up`)"),
        (TWO_NODES, ["--node-rank", "2"], "nodes.node_rank must be below nodes.nnodes (2)"),
        (TWO_NODES, ["--node-rank", "1", "--data-parallel-size-local", "3"],
         "nodes.data_parallel_size_local (3) is above data_parallel_size (2)"),
        (TWO_NODES, ["--node-rank", "1", "--head", "nowhere"], "--head: expected HOST:PORT"),
        ("engine: {kind: fake, data_parallel_size: 2, nodes: {nnodes: 2, master_addr: h}}\n",
         ["--node-rank", "1"], "only the vllm engine runs on several nodes"),
    ],
)  # fmt: skip
def test_a_config_this_node_cannot_run_exits_2_with_the_reason(
    tmp_path: Path, text: str, args: list[str], message: str
) -> None:
    path = write(tmp_path, text)
    result = runner.invoke(app, ["worker", "-c", str(path), *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr


def test_a_bad_config_exits_2_in_a_real_process_without_importing_vllm(tmp_path: Path) -> None:
    path = write(tmp_path, "engine: {data_parallel_size: 2, nodes: {nnodes: 2}}\n")
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "llmserve", "worker", "-c", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert f"error: {path}: engine: nodes.master_addr: set the head node's address" in done.stderr
    assert "| vllm" not in done.stderr  # -X importtime lists every module imported


def test_check_says_which_command_each_node_runs(tmp_path: Path) -> None:
    path = write(tmp_path, TWO_NODES)
    result = runner.invoke(app, ["check", "-c", str(path)])
    assert result.exit_code == 0, result.output
    assert "`llmserve up` on the head (node 0" in result.stderr
    assert "`llmserve worker --node-rank N` on node 1" in result.stderr
