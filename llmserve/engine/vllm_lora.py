"""`engine.lora` for vLLM: AsyncEngineArgs, `vllm serve --lora-modules`, each adapter's id. Pure.

Each adapter has a stable id, its 1-based position in `engine.lora.adapters`: the fast path's
LoRARequests carry it, and vLLM's own handlers, given the adapters as `--lora-modules` in the
same order, number them the same way (vllm.py checks that they did), so both paths run one
loaded copy of each adapter. docs/engine.md, "LoRA adapters and aliases".
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
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
    setting = "engine.lora.max_lora_rank" if config.lora.max_lora_rank else "vLLM's limit"
    for name, path in config.lora.adapters.items():
        problem = adapter_problem(path, limit, f"{setting} ({limit})")
        if problem is not None:
            raise EngineStartError(f"engine.lora.adapters.{name}: {problem}")


def adapter_problem(
    path: str, max_rank: int, rank_limit: str, shapes: Mapping[str, tuple[int, int]] | None = None
) -> str | None:
    """Why the local adapter at `path` cannot be served (None: nothing found wrong, or a hub id,
    which vLLM looks up itself): no PEFT directory, an unreadable adapter_config.json, a rank
    above `max_rank` (`rank_limit` says what that limit is), or weights whose shapes do not fit
    the base model's modules (`shapes`: module_shapes), which vLLM does not check."""
    if not _looks_local(path):
        return None
    where = Path(path).expanduser()
    if not (where / "adapter_config.json").is_file():
        return (f"no LoRA adapter at {path} (a PEFT directory with adapter_config.json and "
                "adapter_model.safetensors)")  # fmt: skip
    try:
        meta = json.loads((where / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        return f"{path}/adapter_config.json is not readable JSON: {exc}"
    if not isinstance(meta, dict) or not isinstance(meta.get("r"), int):
        return f"{path}/adapter_config.json has no rank `r` (not a PEFT LoRA adapter config)"
    rank = adapter_rank(where)
    if rank is not None and rank > max_rank:
        return f"rank {rank} is above {rank_limit}"
    return _shape_problem(where, shapes) if shapes else None


def module_shapes(hf_config: Any) -> dict[str, tuple[int, int]]:
    """(in, out) features of the attention and MLP projections of a Llama-style model (Llama,
    Qwen2, Mistral...), from its Hugging Face config; other modules are not checked."""
    hidden = int(hf_config.hidden_size)
    heads = int(hf_config.num_attention_heads)
    kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(hf_config, "head_dim", None) or hidden // heads)
    shapes = {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
    }
    intermediate = getattr(hf_config, "intermediate_size", None)
    if isinstance(intermediate, int):
        shapes |= {"gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate),
                   "down_proj": (intermediate, hidden)}  # fmt: skip
    return shapes


def _shape_problem(directory: Path, shapes: Mapping[str, tuple[int, int]]) -> str | None:
    for name, shape in safetensors_shapes(directory / "adapter_model.safetensors").items():
        parts = name.split(".")
        if len(parts) < 3 or parts[-2] not in ("lora_A", "lora_B") or len(shape) != 2:
            continue
        module, kind = parts[-3], parts[-2]
        expected = shapes.get(module)
        if expected is None:
            continue
        got, want = (shape[1], expected[0]) if kind == "lora_A" else (shape[0], expected[1])
        if got != want:
            side = "in" if kind == "lora_A" else "out"
            return (f"{name} has {got} {side} features where the base model's {module} has "
                    f"{want}: an adapter of another base model")  # fmt: skip
    return None


_MAX_HEADER_BYTES = 64 * 1024 * 1024  # a safetensors header larger than this is not read


def safetensors_shapes(file: Path) -> dict[str, list[int]]:
    """Each tensor's shape, read from a safetensors file's JSON header (no weights are read);
    empty when the file is absent or not safetensors (vLLM then says what is wrong)."""
    try:
        with file.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 0 < size <= _MAX_HEADER_BYTES:
                return {}
            header = json.loads(handle.read(size))
    except (OSError, ValueError):
        return {}
    if not isinstance(header, dict):
        return {}
    return {name: list(meta["shape"]) for name, meta in header.items()
            if isinstance(meta, dict) and isinstance(meta.get("shape"), list)}  # fmt: skip


def lora_engine_args(config: EngineConfig) -> dict[str, Any]:
    """vLLM's LoRA settings (none without adapters, unless max_loras asks for slots)."""
    lora = config.lora
    if not lora.enabled:
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
    """On CPU, one LoRA slot more than the engine may hold adapters, left empty for good.

    vLLM's CPU LoRA kernels (vllm/lora/ops/torch_ops, vLLM 0.32) select each token's adapter
    weights by slot index, and a token of the base model has index -1: Python's indexing then
    picks the last slot, so a base-model request batched with adapter requests runs with the
    adapter in the last slot (measured: tests/engine/test_engine_lora.py). vLLM fills the first
    free slot, and frees one only when all are taken; with a slot more than adapters, the last
    is never filled, holds zeros, and a base-model token gets exactly the base model. (CUDA's
    kernels skip index -1.) The engine holds at most max(max_loras, adapters) adapters, then:
    `adapter_capacity` refuses loads at run time beyond it."""
    lora = config.lora
    if not lora.enabled:
        return {}
    max_loras = max(lora.batch_loras, len(lora.adapters)) + 1
    args: dict[str, Any] = {"max_loras": max_loras}
    if lora.max_cpu_loras is not None:
        args["max_cpu_loras"] = max(lora.max_cpu_loras, max_loras)
    return args


def adapter_capacity(engine_args: Mapping[str, Any], device: str) -> int | None:
    """How many adapters an engine started with `engine_args` may hold at once: 0 with LoRA
    off; on CPU one less than its slots (cpu_lora_args: the last stays empty); None on GPU,
    where vLLM keeps max_cpu_loras of them in memory and reads the others from disk again when
    a request asks for one."""
    if not engine_args.get("enable_lora"):
        return 0
    if device == "cpu":
        return int(engine_args["max_loras"]) - 1
    return None


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
