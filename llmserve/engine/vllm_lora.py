"""`engine.lora` for vLLM: AsyncEngineArgs, `vllm serve --lora-modules`, each adapter's id. Pure.

Each adapter has a stable id, its 1-based position in `engine.lora.adapters`: the fast path's
LoRARequests carry it, and vLLM's own handlers, given the adapters as `--lora-modules` in the
same order, number them the same way (vllm.py checks that they did), so both paths run one
loaded copy of each adapter. docs/engine.md, "LoRA adapters and aliases".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmserve.config import LORA_RANKS, EngineConfig
from llmserve.errors import EngineStartError

VLLM_DEFAULT_RANK = 16  # vLLM's max_lora_rank, when no adapter says its rank

# AsyncEngineArgs (and `vllm serve` flags) set from engine.lora: not in `options`
OWN_FIELDS = {
    "enable_lora": "lora.adapters",
    "max_loras": "lora.max_loras",
    "max_lora_rank": "lora.max_lora_rank",
    "max_cpu_loras": "lora.max_cpu_loras",
}
OWN_FRONTEND_FIELDS = {"lora_modules": "lora.adapters"}


@dataclass(frozen=True, slots=True)
class Adapter:
    name: str
    lora_id: int  # vLLM's lora_int_id: 1, 2, ... in the order of engine.lora.adapters
    path: str  # an absolute directory, or a hub id


def adapters(config: EngineConfig) -> list[Adapter]:
    return [
        Adapter(name, index, adapter_path(path))
        for index, (name, path) in enumerate(config.lora.adapters.items(), start=1)
    ]


def adapter_path(path: str) -> str:
    """A local directory as an absolute path (vLLM resolves a relative one against its own
    working directory); anything else is a hub id, left as it is."""
    expanded = Path(path).expanduser()
    if _looks_local(path) or expanded.exists():
        return str(expanded.absolute())
    return path


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).exists()


def check_adapters(config: EngineConfig) -> None:
    """EngineStartError for an adapter path that is meant to be local but is no adapter."""
    limit = config.lora.max_lora_rank or LORA_RANKS[-1]
    for name, path in config.lora.adapters.items():
        if not _looks_local(path):
            continue  # a hub id: vLLM finds it in the hub cache, or says it cannot
        where = Path(path).expanduser()
        if not (where / "adapter_config.json").is_file():
            raise EngineStartError(
                f"engine.lora.adapters.{name}: no LoRA adapter at {path} (a PEFT directory "
                "with adapter_config.json and adapter_model.safetensors)"
            )
        rank = adapter_rank(where)
        if rank is not None and rank > limit:
            setting = "engine.lora.max_lora_rank" if config.lora.max_lora_rank else "vLLM's limit"
            raise EngineStartError(
                f"engine.lora.adapters.{name}: rank {rank} is above {setting} ({limit})"
            )


def lora_engine_args(config: EngineConfig) -> dict[str, Any]:
    """vLLM's LoRA settings (none without adapters)."""
    lora = config.lora
    if not lora.adapters:
        return {}
    args: dict[str, Any] = {
        "enable_lora": True,
        "max_loras": lora.batch_loras,
        "max_lora_rank": lora.max_lora_rank or default_rank(config),
    }
    if lora.max_cpu_loras is not None:
        args["max_cpu_loras"] = lora.max_cpu_loras
    return args


def cpu_lora_args(config: EngineConfig) -> dict[str, Any]:
    """On CPU, one LoRA slot more than there are adapters, left empty for good.

    vLLM's CPU LoRA kernels (vllm/lora/ops/torch_ops, vLLM 0.32) select each token's adapter
    weights by slot index, and a token of the base model has index -1: Python's indexing then
    picks the last slot, so a base-model request batched with adapter requests runs with the
    adapter in the last slot (measured: tests/engine/test_engine_lora.py). vLLM fills the first
    free slot, and frees one only when all are taken; with a slot more than adapters, the last
    is never filled, holds zeros, and a base-model token gets exactly the base model. (CUDA's
    kernels skip index -1.)"""
    lora = config.lora
    if not lora.adapters:
        return {}
    max_loras = max(lora.batch_loras, len(lora.adapters) + 1)
    args: dict[str, Any] = {"max_loras": max_loras}
    if lora.max_cpu_loras is not None:
        args["max_cpu_loras"] = max(lora.max_cpu_loras, max_loras)
    return args


def default_rank(config: EngineConfig) -> int:
    """The smallest rank vLLM serves that fits every adapter whose rank can be read."""
    ranks = [r for r in (adapter_rank(Path(p).expanduser()) for p in config.lora.adapters.values())
             if r is not None]  # fmt: skip
    if not ranks:
        return VLLM_DEFAULT_RANK
    largest = max(ranks)
    for allowed in LORA_RANKS:
        if allowed >= largest:
            return allowed
    return LORA_RANKS[-1]  # larger than vLLM serves: vLLM's own error names the adapter


def adapter_rank(directory: Path) -> int | None:
    """The largest rank in an adapter's adapter_config.json (`r`, and `rank_pattern`)."""
    try:
        meta = json.loads((directory / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    ranks = [meta.get("r"), *(meta.get("rank_pattern") or {}).values()]
    valid = [int(r) for r in ranks if isinstance(r, (int, float)) and math.isfinite(r) and r > 0]
    return max(valid) if valid else None


def lora_module_args(config: EngineConfig) -> list[str]:
    """`vllm serve --lora-modules` for the adapters (JSON, so any path works), their parent
    the served model."""
    found = adapters(config)
    if not found:
        return []
    modules = [
        json.dumps({"name": a.name, "path": a.path, "base_model_name": config.model_name})
        for a in found
    ]
    return ["--lora-modules", *modules]
