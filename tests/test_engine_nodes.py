"""An engine over several nodes (engine.nodes, `llmserve worker`): the config checks, the
AsyncEngineArgs of the head and of each worker node, and the worker's watch of the head. Pure:
no vllm, no model (the real head + worker run: tests/engine/test_engine_worker_node.py)."""

from __future__ import annotations

import logging
import socket

import pytest

from llmserve.config import EngineConfig, parse_config
from llmserve.engine.vllm_args import (
    NODE_SETTINGS,
    build_launch,
    build_worker_launch,
    is_multi_node,
    vllm_serve_command,
    worker_plan,
)
from llmserve.engine.vllm_worker import HeadWatch, head_address
from llmserve.errors import ConfigError, EngineStartError

KNOWN = {
    "model", "served_model_name", "max_model_len", "max_num_seqs", "dtype", "tokenizer",
    "tensor_parallel_size", "pipeline_parallel_size", "gpu_memory_utilization",
    "kv_cache_memory_bytes", "enforce_eager", "distributed_executor_backend",
    "enable_chunked_prefill", "max_num_batched_tokens", "disable_log_stats",
    "data_parallel_size", "data_parallel_backend", "enable_prefix_caching", *NODE_SETTINGS,
}  # fmt: skip


def engine(**settings: object) -> EngineConfig:
    return EngineConfig.model_validate({"model": "/models/m", **settings})


def two_nodes(**settings: object) -> EngineConfig:
    """2 nodes (head at 10.0.0.1), data parallel 2, unless `settings` say otherwise."""
    nodes = {"nnodes": 2, "master_addr": "10.0.0.1", **settings.get("nodes", {})}  # type: ignore[dict-item]
    return engine(**{"data_parallel_size": 2, **settings, "nodes": nodes})


def node_keys(args: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in args.items() if k in NODE_SETTINGS}


# -- the config -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("engine_yaml", "message"),
    [
        ("{data_parallel_size: 2, nodes: {nnodes: 2}}", "nodes.master_addr: set the head"),
        (
            "{data_parallel_size: 2, nodes: {nnodes: 2, master_addr: h, node_rank: 2}}",
            "nodes.node_rank must be below nodes.nnodes (2), got 2",
        ),
        (
            "{data_parallel_size: 3, nodes: {nnodes: 2, master_addr: h}}",
            "nodes.nnodes (2) must divide data_parallel_size x tensor_parallel_size x "
            "pipeline_parallel_size (3)",
        ),
        (
            "{tensor_parallel_size: 2, distributed_executor_backend: ray, "
            "nodes: {nnodes: 2, master_addr: h}}",
            "with Ray the Ray cluster spans the nodes: leave engine.nodes unset",
        ),
        (
            "{data_parallel_size: 2, data_parallel_backend: ray, "
            "nodes: {nnodes: 2, master_addr: h}}",
            "leave engine.nodes unset",
        ),
        (
            "{data_parallel_size: 2, nodes: {data_parallel_size_local: 3}}",
            "nodes.data_parallel_size_local (3) is above data_parallel_size (2)",
        ),
        (
            "{data_parallel_size: 4, nodes: {data_parallel_size_local: 2, "
            "data_parallel_start_rank: 3, master_addr: h}}",
            "nodes.data_parallel_start_rank (3) + its local replicas exceed",
        ),
        (
            "{data_parallel_size: 4, nodes: {data_parallel_size_local: 2}}",
            "nodes.data_parallel_address: set the head node's address",
        ),
        ("{nodes: {nnodes: 0}}", "engine.nodes.nnodes: expected greater than or equal to 1"),
        ("{nodes: {master_port: 70000}}", "engine.nodes.master_port: expected less than"),
        (
            "{nodes: {data_parallel_size_local: 0}}",
            "engine.nodes.data_parallel_size_local: expected greater than or equal to 1",
        ),
        ("{nodes: {nnode: 2}}", "unknown setting 'nnode' (did you mean 'nnodes'?)"),
    ],
)
def test_node_settings_that_cannot_work_are_refused_with_a_clear_message(
    engine_yaml: str, message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(f"engine: {engine_yaml}\n", source="c.yaml")
    assert message in str(err.value)
    assert str(err.value).startswith("c.yaml: engine")


def test_a_single_node_config_passes_no_node_arguments_to_vllm() -> None:
    all_local = engine(data_parallel_size=2, nodes={"data_parallel_size_local": 2})
    for config in (engine(), engine(data_parallel_size=2), all_local):
        assert not is_multi_node(config)
        assert node_keys(build_launch(config, "cuda", KNOWN).engine_args) == {}


def test_node_settings_in_options_point_to_engine_nodes() -> None:
    with pytest.raises(EngineStartError, match=r"set engine\.nodes\.master_addr instead"):
        build_launch(engine(options={"master_addr": "h"}), "cuda", KNOWN)


# -- the head (`llmserve up`) -----------------------------------------------------------------


def test_the_head_gets_vllms_node_arguments_as_rank_0() -> None:
    config = two_nodes(nodes={"master_port": 29600, "data_parallel_rpc_port": 29700})
    args = build_launch(config, "cuda", KNOWN).engine_args
    assert node_keys(args) == {
        "nnodes": 2, "node_rank": 0, "master_addr": "10.0.0.1", "master_port": 29600,
        "data_parallel_rpc_port": 29700,
    }  # fmt: skip
    assert args["data_parallel_size"] == 2


def test_the_head_refuses_a_worker_rank() -> None:
    with pytest.raises(EngineStartError, match=r"node_rank is 1: `llmserve up` runs node 0"):
        build_launch(two_nodes(nodes={"node_rank": 1}), "cuda", KNOWN)
    dp_config = engine(data_parallel_size=4, nodes={"data_parallel_size_local": 2,
                       "data_parallel_start_rank": 2, "data_parallel_address": "h"})  # fmt: skip
    with pytest.raises(EngineStartError, match="data_parallel_start_rank is 2"):
        build_launch(dp_config, "cuda", KNOWN)


def test_the_head_never_passes_a_start_rank_vllm_would_take_for_hybrid_load_balancing() -> None:
    config = engine(data_parallel_size=4, nodes={"data_parallel_size_local": 2,
                    "data_parallel_start_rank": 0, "data_parallel_address": "h"})  # fmt: skip
    args = build_launch(config, "cuda", KNOWN).engine_args
    assert "data_parallel_start_rank" not in args
    assert args["data_parallel_size_local"] == 2
    assert args["data_parallel_address"] == "h"


# -- a worker node (`llmserve worker`) --------------------------------------------------------


def test_a_worker_gets_the_heads_settings_with_its_own_rank() -> None:
    head = build_launch(two_nodes(), "cpu", KNOWN).engine_args
    worker = build_worker_launch(two_nodes(nodes={"node_rank": 1}), "cpu", KNOWN)
    assert worker.engine_args == {**head, "node_rank": 1}
    assert worker.env == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # as the head on CPU


def test_a_worker_of_a_single_node_config_has_nothing_to_run() -> None:
    with pytest.raises(EngineStartError, match="runs on one node"):
        build_worker_launch(engine(data_parallel_size=2), "cuda", KNOWN)


def test_node_0_is_the_head_not_a_worker() -> None:
    with pytest.raises(EngineStartError, match=r"node_rank is 0, the head .* its rank, 1 \("):
        worker_plan(two_nodes())


@pytest.mark.parametrize(
    ("settings", "ranks", "engines"),
    [
        # data parallel 4 over 2 nodes: ranks 2 and 3 on node 1
        ({"data_parallel_size": 4, "nodes": {"node_rank": 1}}, range(2, 4), True),
        # 2 nodes x 4 GPUs, TP 2: replicas 2 and 3 on node 1
        ({"data_parallel_size": 4, "tensor_parallel_size": 2, "nodes": {"node_rank": 1}},
         range(2, 4), True),
        # one replica, TP 8 over 2 nodes: node 1 runs 4 of its workers
        ({"data_parallel_size": 1, "tensor_parallel_size": 8, "nodes": {"node_rank": 1}},
         range(0, 1), False),
        # TP 4 x PP 2 over 4 nodes: node 3 runs workers of replica 0
        ({"data_parallel_size": 1, "tensor_parallel_size": 4, "pipeline_parallel_size": 2,
          "nodes": {"nnodes": 4, "node_rank": 3}}, range(0, 1), False),
        # data parallel 2, each replica TP 4 over 2 nodes: node 2 leads replica 1
        ({"data_parallel_size": 2, "tensor_parallel_size": 4,
          "nodes": {"nnodes": 4, "node_rank": 2}}, range(1, 2), True),
    ],
)  # fmt: skip
def test_the_worker_plan_is_vllms_inference_from_the_node_rank(
    settings: dict[str, object], ranks: range, engines: bool
) -> None:
    plan = worker_plan(two_nodes(**settings))
    assert (plan.ranks, plan.engines) == (ranks, engines)


def test_data_parallel_without_nnodes_needs_each_workers_start_rank() -> None:
    base = {"data_parallel_size": 4, "nodes": {"data_parallel_size_local": 2,
            "data_parallel_address": "10.0.0.1", "data_parallel_rpc_port": 13345}}  # fmt: skip
    with pytest.raises(EngineStartError, match="--data-parallel-start-rank"):
        worker_plan(engine(**base))
    config = engine(**{**base, "nodes": {**base["nodes"], "data_parallel_start_rank": 2}})  # type: ignore[dict-item]
    plan = worker_plan(config)
    assert (plan.ranks, plan.engines) == (range(2, 4), True)
    assert "rank(s) 2-3 of 4, handshake with the head at 10.0.0.1:13345" in plan.describe(config)
    args = build_worker_launch(config, "cuda", KNOWN).engine_args
    assert node_keys(args) == {
        "nnodes": 1, "node_rank": 0, "data_parallel_size_local": 2,
        "data_parallel_start_rank": 2, "data_parallel_address": "10.0.0.1",
        "data_parallel_rpc_port": 13345,
    }  # fmt: skip


def test_a_worker_never_runs_with_ray() -> None:
    ray_dp = engine(data_parallel_size=2, data_parallel_backend="ray",
                    nodes={"data_parallel_size_local": 1, "master_addr": "h"})  # fmt: skip
    with pytest.raises(EngineStartError, match="ray start --address"):
        worker_plan(ray_dp)


def test_the_plan_describes_a_replica_that_spans_nodes() -> None:
    config = two_nodes(data_parallel_size=1, tensor_parallel_size=8,
                       nodes={"node_rank": 1, "master_port": 29501})  # fmt: skip
    text = worker_plan(config).describe(config)
    assert text.startswith("node 1 of 2: vLLM headless workers of data-parallel rank 0")
    assert "(8 workers) spans nodes; torch.distributed at 10.0.0.1:29501" in text


def test_on_cpu_a_replica_of_several_workers_gets_the_multiprocess_executor() -> None:
    one = build_launch(engine(), "cpu", KNOWN).engine_args
    tp = build_launch(engine(tensor_parallel_size=2), "cpu", KNOWN).engine_args
    assert one["distributed_executor_backend"] == "uni"
    assert tp["distributed_executor_backend"] == "mp"


def test_the_logged_command_is_vllm_serve_headless() -> None:
    args = build_worker_launch(two_nodes(nodes={"node_rank": 1}), "cuda", KNOWN).engine_args
    command = vllm_serve_command(args)
    assert command[:4] == ["vllm", "serve", "/models/m", "--headless"]
    joined = " ".join(command)
    assert "--nnodes 2 --node-rank 1 --master-addr 10.0.0.1" in joined
    assert "disable-log-stats" not in joined  # store_true only in vLLM: false is its default


# -- the worker's watch of the head -----------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def watch(clock: Clock, **kwargs: float) -> HeadWatch:
    return HeadWatch(("h", 1), on_lost=lambda: None, clock=clock, **kwargs)  # type: ignore[arg-type]


def test_a_head_never_seen_is_never_declared_gone_but_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    w = watch(clock, unseen_warning_seconds=60)
    with caplog.at_level(logging.WARNING):
        for _ in range(200):
            clock.now += 1
            assert not w.observe("refused")
    assert not w.lost
    assert caplog.text.count("has not accepted a connection in 60 s") == 1


def test_two_refused_connections_after_an_accepted_one_mean_the_head_is_gone() -> None:
    clock = Clock()
    w = watch(clock)
    assert not w.observe("ok")
    assert not w.observe("refused")
    assert not w.observe("ok")  # a single refusal is forgiven
    assert not w.observe("refused")
    assert w.observe("refused")
    assert w.lost
    assert not w.observe("refused")  # reported once


def test_a_silent_head_is_gone_after_silent_seconds_only() -> None:
    clock = Clock()
    w = watch(clock, silent_seconds=30)
    w.observe("ok")
    for _ in range(29):
        clock.now += 1
        assert not w.observe("failed")  # timeouts: the network may come back
    clock.now += 1
    assert w.observe("failed")


def test_the_watch_probes_a_real_port_and_stops_the_worker_when_it_closes() -> None:
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    lost = threading.Event()
    w = HeadWatch(listener.getsockname(), on_lost=lost.set, interval=0.05)
    assert w.probe() == "ok"
    w.start()
    try:
        for _ in range(100):
            if w.seen:
                break
            lost.wait(0.02)
        assert w.seen
        listener.close()  # the head's process ends: its port refuses
        assert lost.wait(5)
        assert w.lost and w.probe() == "refused"
    finally:
        w.stop()
        listener.close()


@pytest.mark.parametrize(
    ("text", "address"),
    [("10.0.0.1:8000", ("10.0.0.1", 8000)), ("[fd00::1]:8000", ("fd00::1", 8000)),
     ("head.internal:80", ("head.internal", 80))],
)  # fmt: skip
def test_head_addresses_parse(text: str, address: tuple[str, int]) -> None:
    assert head_address(text) == address


@pytest.mark.parametrize("text", ["10.0.0.1", ":8000", "h:port", "h:70000"])
def test_bad_head_addresses_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        head_address(text)


def test_every_config_in_docs_scaling_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    import re
    from pathlib import Path

    monkeypatch.setenv("REDIS_PASSWORD", "x")
    text = (Path(__file__).resolve().parents[1] / "docs" / "scaling.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    assert len(blocks) >= 5
    for block in blocks:
        config = parse_config(block, source="docs/scaling.md")
        engine = config.engine
        if is_multi_node(engine) and engine.nodes.nnodes > 1:  # node 1 has its share
            node_1 = engine.nodes.model_copy(update={"node_rank": 1})
            assert worker_plan(engine.model_copy(update={"nodes": node_1})).node_rank == 1
