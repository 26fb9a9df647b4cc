"""`llmserve worker`: this node's share of an engine that spans nodes (vLLM headless mode)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NoReturn

import typer
from pydantic import ValidationError

from llmserve.cli.common import ConfigOption, load_or_exit
from llmserve.config import Config, EngineConfig
from llmserve.engine.vllm_args import worker_plan
from llmserve.errors import EngineStartError


def worker(
    config: Path | None = ConfigOption,
    node_rank: int | None = typer.Option(
        None, "--node-rank", min=0, help="This node's rank, 1 to nnodes - 1 (engine.nodes)."
    ),
    data_parallel_start_rank: int | None = typer.Option(
        None,
        "--data-parallel-start-rank",
        min=0,
        help="First data-parallel rank on this node (engine.nodes.data_parallel_start_rank).",
    ),
    data_parallel_size_local: int | None = typer.Option(
        None,
        "--data-parallel-size-local",
        min=1,
        help="Data-parallel replicas on this node (engine.nodes.data_parallel_size_local).",
    ),
    model: str | None = typer.Option(
        None, "--model", help="The model's path on this node, when not engine.model's."
    ),
    head: str | None = typer.Option(
        None,
        "--head",
        help="HOST:PORT of the head's API, watched: when the head goes away the worker exits 1 "
        "(default: engine.nodes.master_addr and server.port; `none`: no watch).",
    ),
) -> None:
    """Run vLLM's headless engine processes on a node other than the head, from the head's
    config file (what `vllm serve --headless` runs; see docs/scaling.md).

    The head runs `llmserve up` with the same file. Exit codes: 0 after SIGTERM/SIGINT,
    1 when vLLM's engine processes end by themselves or cannot start, 2 on a config error.
    """
    from llmserve.logs import configure_logging

    cfg = load_or_exit(config)
    overrides = {"node_rank": node_rank, "data_parallel_start_rank": data_parallel_start_rank,
                 "data_parallel_size_local": data_parallel_size_local}  # fmt: skip
    engine = _with_overrides(cfg, {k: v for k, v in overrides.items() if v is not None}, model)
    if engine.kind != "vllm":
        _fail(2, f"engine.kind is {engine.kind}: only the vllm engine runs on several nodes")
    try:
        worker_plan(engine)  # the node settings, before the seconds of importing vLLM
    except EngineStartError as exc:
        _fail(2, str(exc))
    configure_logging(cfg.logging)
    watched = _head(head, engine, cfg.server.port)
    from llmserve.engine.vllm_worker import run_worker

    try:
        code = run_worker(engine, watched)
    except Exception as exc:  # vLLM failed to start: one clear line, details in the log
        logging.getLogger("llmserve").error("worker failed: %s", exc, exc_info=exc)
        _fail(1, str(exc))
    raise typer.Exit(code)


def _with_overrides(cfg: Config, nodes: dict[str, Any], model: str | None) -> EngineConfig:
    """The engine section with the command line's values, validated again."""
    if not nodes and model is None:
        return cfg.engine
    data = cfg.engine.model_dump()
    data["nodes"].update(nodes)
    if model is not None:
        data["model"] = model
        # the head's served name stays the clients' name, whatever this node's path is
        data["served_model_name"] = cfg.engine.model_name
    try:
        return EngineConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(part) for part in ("engine", *err["loc"]))
        _fail(2, f"{where}: {err['msg'].removeprefix('Value error, ')}")


def _head(option: str | None, engine: EngineConfig, port: int) -> tuple[str, int] | None:
    """The head's API address to watch: --head, else the head's address and server.port."""
    from llmserve.engine.vllm_worker import head_address

    if option == "none":
        return None
    if option is None:
        host = engine.nodes.data_parallel_address or engine.nodes.master_addr
        return (host, port) if host else None
    try:
        return head_address(option)
    except ValueError as exc:
        _fail(2, f"--head: {exc}")


def _fail(code: int, message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("worker")(worker)
