"""`llmserve check`: validate a config file and print the effective config (secrets masked)."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
import yaml

from llmserve.cli.common import ConfigOption, load_or_exit
from llmserve.config import Config, effective_config, resolve_config_path
from llmserve.engine.vllm_args import (
    cpu_dtype,
    cpu_kv_cache_bytes,
    is_multi_node,
    read_cpu_flags,
    read_mem_available,
)
from llmserve.errors import EngineStartError
from llmserve.models.sampling import model_sampling_defaults


def check(config: Path | None = ConfigOption) -> None:
    """Validate the config file; print the effective config with every default filled in.

    Exits 2 and names the file, the setting and what was expected when something is wrong.
    """
    cfg = load_or_exit(config)
    _check_engine_options(cfg)
    typer.echo(f"# {resolve_config_path(config)}: OK", err=True)
    _show_sampling_defaults(cfg)
    _show_cpu_dtype(cfg)
    _show_nodes(cfg)
    _check_store_persistence(cfg)
    _check_key_store_persistence(cfg)
    typer.echo(yaml.safe_dump(effective_config(cfg), sort_keys=False).rstrip())


def _show_sampling_defaults(cfg: Config) -> None:
    """What a request that leaves sampling fields unset gets (the model's generation config)."""
    if cfg.engine.kind != "vllm" or not Path(cfg.engine.model).is_dir():
        return
    defaults = model_sampling_defaults(Path(cfg.engine.model))
    shown = " ".join(f"{k}={v}" for k, v in defaults.items()) or "none (vLLM's neutral values)"
    typer.echo(f"# sampling defaults from the model's generation_config.json: {shown}", err=True)


def _check_store_persistence(cfg: Config) -> None:
    """A Redis limiter store without persistence loses day and month quotas on a restart."""
    from llmserve.auth.store_url import is_redis_url

    if not is_redis_url(cfg.limits.store):  # every Redis form: one server, Sentinel, Cluster
        return
    from llmserve.limits.stores import store_from_url

    _warn_without_persistence(lambda: store_from_url(cfg.limits.store))


def _check_key_store_persistence(cfg: Config) -> None:
    """A Redis key store without persistence loses every API key on a restart."""
    from llmserve.auth.store import is_redis_url, key_store_from_url

    if cfg.auth.enabled and is_redis_url(cfg.auth.keys):
        _warn_without_persistence(lambda: key_store_from_url(cfg.auth.keys))


def _warn_without_persistence(open_store: Callable[[], Any]) -> None:
    """Ask the store's Redis once (limits/stores/persistence.py); print its warning if any."""
    from llmserve.limits.stores.persistence import ChecksPersistence

    async def probe() -> str | None:
        store = open_store()
        try:
            if isinstance(store, ChecksPersistence):
                return await store.persistence_warning()
            return None
        finally:
            await store.close()

    warning = asyncio.run(probe())
    if warning:
        typer.echo(f"# warning: {warning}", err=True)


def _show_cpu_dtype(cfg: Config) -> None:
    """What `engine.dtype` becomes on this machine's CPU (the GPU keeps vLLM's choice)."""
    if cfg.engine.kind != "vllm" or cfg.engine.device == "cuda":
        return
    memory = read_mem_available()
    choice = cpu_dtype(cfg.engine, read_cpu_flags(), memory)
    typer.echo(f"# engine.dtype on CPU: {choice.dtype} ({choice.reason})", err=True)
    kv = cpu_kv_cache_bytes(cfg.engine, choice.dtype, memory)
    how = "auto" if cfg.engine.cpu_kv_cache_bytes == "auto" else "set"
    typer.echo(f"# engine.cpu_kv_cache_bytes on CPU: {kv / 2**20:.0f} MiB ({how})", err=True)


def _show_nodes(cfg: Config) -> None:
    """Which command each node of a multi-node engine runs (docs/scaling.md)."""
    engine = cfg.engine
    if engine.kind != "vllm" or not is_multi_node(engine):
        return
    nodes = engine.nodes
    if nodes.nnodes > 1:
        others = "1" if nodes.nnodes == 2 else f"1 to {nodes.nnodes - 1}"
        shown = f"`llmserve worker --node-rank N` on node {others}"
    else:
        shown = "`llmserve worker --data-parallel-start-rank N` on the nodes of the other ranks"
    typer.echo(
        f"# engine.nodes: `llmserve up` on the head (node 0, data-parallel rank 0), {shown}",
        err=True,
    )


def _check_engine_options(cfg: Config) -> None:
    """engine.options are vLLM's own names: checked against vLLM when it is installed."""
    if cfg.engine.kind != "vllm" or not (cfg.engine.options or cfg.engine.frontend_options):
        return
    if importlib.util.find_spec("vllm") is None:
        typer.echo("# engine.options not checked: vllm is not installed", err=True)
        return
    from llmserve.engine.vllm import check_engine_options

    try:
        check_engine_options(cfg.engine)
    except EngineStartError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def register(app: typer.Typer) -> None:
    app.command("check")(check)
