"""From `EngineConfig` to vLLM's AsyncEngineArgs keywords and process environment: pure.

No vllm import here: the caller passes the names AsyncEngineArgs accepts, so this is tested
without vllm. Why the CPU settings are what they are: docs/engine.md, "CPU notes".
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llmserve.config import EngineConfig
from llmserve.engine import vllm_lora
from llmserve.errors import EngineStartError

Device = Literal["cpu", "cuda"]

# Defaults set before vllm is first imported: no hub access (models are local or pre-downloaded),
# no telemetry. An operator's own value of these variables wins.
BASE_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
# On CPU the model runs inside the engine-core process ("uni"): faster and 700 MB lighter here.
CPU_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}

# engine.nodes settings: vLLM's AsyncEngineArgs of the same names (docs/scaling.md).
NODE_SETTINGS = (
    "nnodes",
    "node_rank",
    "master_addr",
    "master_port",
    "data_parallel_size_local",
    "data_parallel_start_rank",
    "data_parallel_address",
    "data_parallel_rpc_port",
)

# Settings that have their own EngineConfig field: setting them in `options` is ambiguous.
_OWN_FIELDS = {
    "model": "model",
    "tokenizer": "model",
    "served_model_name": "served_model_name",
    "max_model_len": "max_model_len",
    "max_num_seqs": "max_num_seqs",
    "dtype": "dtype",
    "tensor_parallel_size": "tensor_parallel_size",
    "pipeline_parallel_size": "pipeline_parallel_size",
    "data_parallel_size": "data_parallel_size",
    "data_parallel_backend": "data_parallel_backend",
    "distributed_executor_backend": "distributed_executor_backend",
    "gpu_memory_utilization": "gpu_memory_utilization",
    "kv_cache_memory_bytes": "cpu_kv_cache_bytes",
    "reasoning_parser": "reasoning_parser",
    **{name: f"nodes.{name}" for name in NODE_SETTINGS},
    **vllm_lora.OWN_FIELDS,
}
# Frontend settings (`vllm serve` flags) with their own EngineConfig field.
_OWN_FRONTEND_FIELDS = {
    "tool_call_parser": "tool_call_parser",
    "enable_auto_tool_choice": "enable_auto_tool_choice",
    "tool_strict_level": "tool_strict_level",
    "chat_template": "chat_template",
    "served_model_name": "served_model_name",
    "model": "model",
    **vllm_lora.OWN_FRONTEND_FIELDS,
}


@dataclass(frozen=True, slots=True)
class EngineLaunch:
    """What starting vLLM needs: the device, AsyncEngineArgs keywords, environment to force."""

    device: Device
    engine_args: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def priority_scheduling(self) -> bool:
        return self.engine_args.get("scheduling_policy") == "priority"


def resolve_device(config: EngineConfig, cuda_available: bool) -> Device:
    if config.device == "cuda" and not cuda_available:
        raise EngineStartError("engine.device is cuda but no CUDA device is visible")
    if config.device == "auto":
        return "cuda" if cuda_available else "cpu"
    return config.device


def build_launch(
    config: EngineConfig,
    device: Device,
    known_options: Collection[str],
    cpu_flags: Collection[str] = frozenset(),
    mem_available: int | None = None,
) -> EngineLaunch:
    """The full launch description; raise EngineStartError for options vLLM would refuse.
    `cpu_flags` and `mem_available` (read_cpu_flags, read_mem_available) steer `dtype: auto`
    on CPU."""
    check_head_node(config)
    return _launch(config, device, known_options, cpu_flags, mem_available, head=True)


def build_worker_launch(
    config: EngineConfig,
    device: Device,
    known_options: Collection[str],
    cpu_flags: Collection[str] = frozenset(),
    mem_available: int | None = None,
) -> EngineLaunch:
    """What `llmserve worker` gives vLLM's headless mode (`vllm serve --headless`): the head's
    settings with this node's rank; raise EngineStartError when this node has nothing to run."""
    worker_plan(config)
    return _launch(config, device, known_options, cpu_flags, mem_available, head=False)


def _launch(
    config: EngineConfig,
    device: Device,
    known_options: Collection[str],
    cpu_flags: Collection[str],
    mem_available: int | None,
    *,
    head: bool,
) -> EngineLaunch:
    check_options(config.options, known_options)
    cpu = device == "cpu"
    if cpu:
        check_no_ray_on_cpu(config)
    args = _common_args(config)
    args.update(node_args(config, head=head))
    args.update(_cpu_args(config, cpu_flags, mem_available) if cpu else _cuda_args(config))
    args.update(config.options)
    if device == "cpu":
        check_seed_safe_on_cpu(args)
    return EngineLaunch(
        device=device, engine_args=args, env=dict(CPU_ENV if device == "cpu" else {})
    )


def check_options(options: Mapping[str, Any], known_options: Collection[str]) -> None:
    for name in options:
        if name in _OWN_FIELDS:
            raise EngineStartError(f"engine.options.{name}: set engine.{_OWN_FIELDS[name]} instead")
        if name not in known_options:
            hint = difflib.get_close_matches(name, list(known_options), n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise EngineStartError(
                f"engine.options.{name}: not an option of vLLM's AsyncEngineArgs{suggestion}"
            )


def check_no_ray_on_cpu(config: EngineConfig) -> None:
    """vLLM's CPU platform runs nothing on Ray (measured with vLLM 0.32: a Ray executor fails
    with "current platform cpu does not support ray", Ray data parallel with "No  found in Ray
    cluster"): say so before vLLM starts, naming the setting."""
    for name in ("data_parallel_backend", "distributed_executor_backend"):
        if getattr(config, name) == "ray" and (
            name == "distributed_executor_backend" or config.data_parallel_size > 1
        ):
            raise EngineStartError(
                f"engine.{name}: ray is for GPUs; vLLM's CPU backend does not run on Ray "
                "(use mp; docs/scaling.md)"
            )


def check_seed_safe_on_cpu(args: Mapping[str, Any]) -> None:
    """On CPU a seeded request whose prefill is chunked kills the engine core: forbid chunking."""
    if args.get("enable_chunked_prefill"):
        raise EngineStartError(
            "engine.options.enable_chunked_prefill: must stay false on CPU "
            "(a request with `seed` and a chunked prefill crashes vLLM's CPU engine)"
        )
    batched = args.get("max_num_batched_tokens")
    if batched is not None and batched < args["max_model_len"]:
        raise EngineStartError(
            f"engine.options.max_num_batched_tokens: must be at least max_model_len "
            f"({args['max_model_len']}) on CPU, so that no prompt is chunked"
        )


def frontend_args(config: EngineConfig, known_options: Collection[str]) -> list[str]:
    """`vllm serve` command-line arguments for vLLM's request handlers (the engine is already
    built: only frontend settings matter here)."""
    args = [config.model, "--served-model-name", config.model_name]
    args += ["--tool-strict-level", config.tool_strict_level]
    if config.tool_call_parser:
        args += ["--tool-call-parser", config.tool_call_parser]
    if config.enable_auto_tool_choice:
        args.append("--enable-auto-tool-choice")
    if config.chat_template:
        args += ["--chat-template", config.chat_template]
    args += vllm_lora.lora_module_args(config)
    for name, value in config.frontend_options.items():
        if name in _OWN_FRONTEND_FIELDS:
            raise EngineStartError(
                f"engine.frontend_options.{name}: set engine.{_OWN_FRONTEND_FIELDS[name]} instead"
            )
        if name not in known_options:
            hint = difflib.get_close_matches(name, list(known_options), n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise EngineStartError(
                f"engine.frontend_options.{name}: not a `vllm serve` frontend option{suggestion}"
            )
        args += _flag(name, value)
    return args


def _flag(name: str, value: Any) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if value is True:
        return [flag]
    if value is False:
        return ["--no-" + name.replace("_", "-")]
    if isinstance(value, (dict, list)):
        return [flag, json.dumps(value)]
    return [flag, str(value)]


def _common_args(config: EngineConfig) -> dict[str, Any]:
    reasoning = {"reasoning_parser": config.reasoning_parser} if config.reasoning_parser else {}
    executor = config.distributed_executor_backend
    return {
        **reasoning,
        # a dict here: vllm.py turns it into vLLM's StructuredOutputsConfig
        "structured_outputs_config": _structured_outputs(config),
        "model": config.model,
        "served_model_name": config.model_name,
        "max_model_len": config.max_model_len,
        "max_num_seqs": config.max_num_seqs,
        "dtype": config.dtype,
        "tensor_parallel_size": config.tensor_parallel_size,
        "pipeline_parallel_size": config.pipeline_parallel_size,
        "data_parallel_size": config.data_parallel_size,
        "data_parallel_backend": config.data_parallel_backend,
        **({"distributed_executor_backend": executor} if executor else {}),
        # Stats stay on: our stat logger and vLLM's own vllm:* Prometheus series need them.
        "disable_log_stats": False,
        **vllm_lora.lora_engine_args(config),
    }


def _structured_outputs(config: EngineConfig) -> dict[str, Any]:
    # vLLM allows `disable_any_whitespace` only with a named backend (not `auto`)
    if config.compact_json:
        return {"backend": "xgrammar", "disable_any_whitespace": True}
    return {}


# On CPU, `dtype: auto` keeps the checkpoint's bfloat16 only where the CPU computes bfloat16
# natively (AVX-512 BF16 or AMX on x86, BF16 on Arm); elsewhere bfloat16 runs 3.5x slower than
# float32 (measured: docs/engine.md, "CPU notes"), so a model whose float32 weights fit the
# memory budget runs in float32: the weights in float32 plus the KV cache within
# FLOAT32_MEMORY_SHARE of the memory available at start-up (CPU_FLOAT32_MAX_BYTES of weights
# where that cannot be read).
CPU_FLOAT32_MAX_BYTES = 4 * 1024**3
FLOAT32_MEMORY_SHARE = 0.6
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
_BYTES_PER_PARAM = {"float32": 4, "float16": 2, "bfloat16": 2, "float": 4, "half": 2}


@dataclass(frozen=True, slots=True)
class DtypeChoice:
    dtype: str  # what vLLM gets ("auto": the checkpoint's own)
    reason: str  # for the start-up log and `llmserve check`
    slow: bool = False  # a choice known to run several times slower than it could


def cpu_dtype(
    config: EngineConfig, cpu_flags: Collection[str], mem_available: int | None = None
) -> DtypeChoice:
    """The dtype to run on CPU: what the config says; for `auto`, see NATIVE_BF16_FLAGS.
    `mem_available`: bytes of memory available (MemAvailable), None where unknown."""
    if config.dtype != "auto":
        return DtypeChoice(config.dtype, "set in engine.dtype")
    if NATIVE_BF16_FLAGS & set(cpu_flags):
        return DtypeChoice("auto", "the CPU computes bfloat16 natively: the checkpoint's dtype")
    weights = _float32_weight_bytes(Path(config.model))
    if weights is not None and _float32_fits(weights, config, mem_available):
        return DtypeChoice(
            "float32",
            "no native bfloat16 on this CPU, or ONEDNN_MAX_CPU_ISA caps it below: float32 "
            "(bfloat16 runs 3.5x slower there)",
        )
    return DtypeChoice(
        "auto",
        "no native bfloat16 on this CPU, but the weights are too large (or unknown) for "
        "float32: the checkpoint's dtype, which may run 3.5x slower than float32 (set "
        "engine.dtype: float32 if the memory allows)",
        slow=True,
    )


def _float32_fits(weights: int, config: EngineConfig, mem_available: int | None) -> bool:
    if mem_available is None:
        return weights <= CPU_FLOAT32_MAX_BYTES
    kv = cpu_kv_cache_bytes(config, "float32", mem_available)
    return weights + kv <= FLOAT32_MEMORY_SHARE * mem_available


# `cpu_kv_cache_bytes: auto`: room for max_num_seqs full-length sequences (and a block of
# slack each), within KV_MEMORY_SHARE of the memory available at start-up, at least
# KV_MIN_BYTES; KV_FALLBACK_BYTES where the model's shape cannot be read.
KV_MEMORY_SHARE = 0.25
KV_MIN_BYTES = 256 * 1024**2
KV_FALLBACK_BYTES = 1024**3
KV_BLOCK_TOKENS = 16


def cpu_kv_cache_bytes(config: EngineConfig, dtype: str, mem_available: int | None) -> int:
    """The KV cache of one CPU worker: `cpu_kv_cache_bytes`, or for `auto` what the batch
    needs at `dtype` ("auto": the checkpoint's), split over the replica's workers."""
    if config.cpu_kv_cache_bytes != "auto":
        return int(config.cpu_kv_cache_bytes)
    per_token = kv_bytes_per_token(Path(config.model), dtype)
    if per_token is None:
        return KV_FALLBACK_BYTES
    tokens = config.max_num_seqs * (config.max_model_len + KV_BLOCK_TOKENS)
    need = -(-per_token * tokens // _replica_workers(config))
    if mem_available is not None:
        need = min(need, int(KV_MEMORY_SHARE * mem_available))
    return max(need, KV_MIN_BYTES)


def kv_bytes_per_token(model_dir: Path, dtype: str) -> int | None:
    """Bytes of keys and values one token takes over all layers (None when unknown)."""
    try:
        meta = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    meta = meta.get("text_config", meta)  # multimodal configs nest the language model's
    try:
        layers = int(meta["num_hidden_layers"])
        heads = int(meta.get("num_attention_heads") or 0)
        kv_heads = int(meta.get("num_key_value_heads") or heads)
        head_dim = int(meta.get("head_dim") or meta["hidden_size"] // heads)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    if dtype == "auto":
        dtype = str(meta.get("torch_dtype") or meta.get("dtype") or "")
    per_value = _BYTES_PER_PARAM.get(dtype)
    if per_value is None or min(layers, kv_heads, head_dim) <= 0:
        return None
    return 2 * layers * kv_heads * head_dim * per_value


def read_mem_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Bytes of memory available for new work (Linux MemAvailable); None where unreadable."""
    try:
        text = meminfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == "MemAvailable" and value.split():
            return int(value.split()[0]) * 1024  # kB
    return None


def read_cpu_flags(
    cpuinfo: Path = Path("/proc/cpuinfo"), environ: Mapping[str, str] = os.environ
) -> frozenset[str]:
    """The CPU's feature flags (x86 `flags`, Arm `Features`) this process may use: without the
    bfloat16 ones where `ONEDNN_MAX_CPU_ISA` caps oneDNN (which runs PyTorch's CPU matrix
    products) below them. Empty where unreadable."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            flags = frozenset(value.split())
            return flags - NATIVE_BF16_FLAGS if _isa_cap_below_bf16(environ) else flags
    return frozenset()


# oneDNN's ISA names (ONEDNN_MAX_CPU_ISA) below AVX-512 BF16: bfloat16 is emulated under them
_ONEDNN_BELOW_BF16 = frozenset(
    {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
)


def _isa_cap_below_bf16(environ: Mapping[str, str]) -> bool:
    return environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper() in _ONEDNN_BELOW_BF16


def _float32_weight_bytes(model_dir: Path) -> int | None:
    """The size of the model's weights in float32 (None when it cannot be told offline)."""
    try:
        meta = json.loads((model_dir / "config.json").read_text())
        on_disk = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    except (OSError, ValueError):
        return None
    dtype = str(meta.get("torch_dtype") or meta.get("dtype") or "")
    per_param = _BYTES_PER_PARAM.get(dtype)
    if not on_disk or per_param is None:
        return None
    return on_disk * 4 // per_param


def _cpu_args(
    config: EngineConfig, cpu_flags: Collection[str], mem_available: int | None
) -> dict[str, Any]:
    dtype = cpu_dtype(config, cpu_flags, mem_available).dtype
    return {
        "dtype": dtype,
        "enforce_eager": True,  # else inductor compiles C++ kernels at start-up
        "kv_cache_memory_bytes": cpu_kv_cache_bytes(config, dtype, mem_available),
        # one worker per replica runs inside the engine core; several need processes
        "distributed_executor_backend": config.distributed_executor_backend
        or ("uni" if _replica_workers(config) == 1 else "mp"),
        # Whole prompts in one step: a chunked seeded prefill crashes the CPU engine.
        "enable_chunked_prefill": False,
        "max_num_batched_tokens": max(config.max_model_len, 2048),
        # an empty LoRA slot: base-model requests next to adapter ones stay on the base model
        **vllm_lora.cpu_lora_args(config),
    }


def _cuda_args(config: EngineConfig) -> dict[str, Any]:
    return {"gpu_memory_utilization": config.gpu_memory_utilization}


# -- several nodes (docs/scaling.md) -----------------------------------------------------------


def _replica_workers(config: EngineConfig) -> int:
    return config.tensor_parallel_size * config.pipeline_parallel_size


def is_multi_node(config: EngineConfig) -> bool:
    """Whether the engine runs on more nodes than the head: `nodes.nnodes > 1`, or fewer
    data-parallel replicas on the head than in all."""
    nodes = config.nodes
    local = nodes.data_parallel_size_local
    return nodes.nnodes > 1 or (local is not None and local < config.data_parallel_size)


def node_args(config: EngineConfig, *, head: bool) -> dict[str, Any]:
    """The AsyncEngineArgs of `engine.nodes` (none on a single node). The head never gets a
    data-parallel start rank: vLLM would take it for its hybrid load-balancing mode."""
    if not is_multi_node(config):
        return {}
    nodes = config.nodes
    args: dict[str, Any] = {"nnodes": nodes.nnodes, "node_rank": nodes.node_rank}
    for name in NODE_SETTINGS[2:]:
        value = getattr(nodes, name)
        if value is not None and not (head and name == "data_parallel_start_rank"):
            args[name] = value
    return args


def check_head_node(config: EngineConfig) -> None:
    """`llmserve up` is node 0: it runs the API and data-parallel rank 0."""
    nodes = config.nodes
    if not is_multi_node(config):
        return
    if nodes.node_rank != 0:
        raise EngineStartError(
            f"engine.nodes.node_rank is {nodes.node_rank}: `llmserve up` runs node 0 (the head); "
            f"on node {nodes.node_rank} run `llmserve worker`"
        )
    if nodes.data_parallel_start_rank:
        raise EngineStartError(
            f"engine.nodes.data_parallel_start_rank is {nodes.data_parallel_start_rank}: the "
            "head (`llmserve up`) has rank 0; a worker node's start rank belongs to "
            "`llmserve worker --data-parallel-start-rank`"
        )


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    """What one `llmserve worker` node runs, as vLLM's headless mode will decide it."""

    node_rank: int
    nnodes: int
    ranks: range  # the data-parallel ranks this node serves
    engines: bool  # True: engine cores of `ranks`; False: workers of a replica led elsewhere

    def describe(self, config: EngineConfig) -> str:
        nodes = config.nodes
        ranks = _show_ranks(self.ranks)
        where = f"node {self.node_rank} of {self.nnodes}" if self.nnodes > 1 else "a worker node"
        if self.engines:
            host = nodes.data_parallel_address or nodes.master_addr
            port = nodes.data_parallel_rpc_port or 29550
            return (
                f"{where}: vLLM headless engine(s) for data-parallel rank(s) {ranks} of "
                f"{config.data_parallel_size}, handshake with the head at {host}:{port}"
            )
        port = nodes.master_port or 29501
        return (
            f"{where}: vLLM headless workers of data-parallel rank {ranks}, whose tensor x "
            f"pipeline parallel group ({_replica_workers(config)} workers) spans nodes; "
            f"torch.distributed at {nodes.master_addr}:{port}"
        )


def _show_ranks(ranks: range) -> str:
    return str(ranks.start) if len(ranks) == 1 else f"{ranks.start}-{ranks.stop - 1}"


def worker_plan(config: EngineConfig) -> WorkerPlan:
    """This worker node's share (vLLM's own inference, arg_utils.create_engine_config and
    ParallelConfig.node_rank_within_dp). Raise EngineStartError when the engine runs on one
    node, or the settings are not a worker node's."""
    if not is_multi_node(config):
        raise EngineStartError(
            "engine.nodes: this config runs on one node (nodes.nnodes is 1 and every "
            "data-parallel replica is local): `llmserve worker` has nothing to run"
        )
    nodes = config.nodes
    dp, per_replica = config.data_parallel_size, _replica_workers(config)
    local, start = nodes.data_parallel_size_local, nodes.data_parallel_start_rank
    if config.data_parallel_backend == "ray" or config.distributed_executor_backend == "ray":
        raise EngineStartError(
            "engine: `llmserve worker` runs vLLM's multiprocess backend; with Ray, nodes join "
            "with `ray start --address` and need no llmserve worker"
        )
    if nodes.nnodes == 1:
        if not start:
            raise EngineStartError(
                "engine.nodes.data_parallel_start_rank: give this worker node its first "
                "data-parallel rank, 1 or more (`llmserve worker --data-parallel-start-rank N`)"
            )
        assert local is not None  # is_multi_node
        return WorkerPlan(0, 1, range(start, start + local), engines=True)
    if nodes.node_rank == 0:
        ranks = "1" if nodes.nnodes == 2 else f"1 to {nodes.nnodes - 1}"
        raise EngineStartError(
            "engine.nodes.node_rank is 0, the head (`llmserve up`): give this worker node its "
            f"rank, {ranks} (`llmserve worker --node-rank N`)"
        )
    local_world = dp * per_replica // nodes.nnodes
    inferred = nodes.node_rank * local_world // per_replica
    if local_world >= per_replica:  # whole replicas on each node
        count = local if local is not None else local_world // per_replica
        first = start if start is not None else inferred
        return WorkerPlan(nodes.node_rank, nodes.nnodes, range(first, first + count), True)
    nodes_per_replica = per_replica // local_world
    engines = nodes.node_rank % nodes_per_replica == 0  # leads its replica: the engine core
    return WorkerPlan(nodes.node_rank, nodes.nnodes, range(inferred, inferred + 1), engines)


# AsyncEngineArgs whose `vllm serve` flag has no --no- form (false is their default).
_STORE_TRUE_FLAGS = frozenset({"disable_log_stats", "aggregate_engine_logging"})


def vllm_serve_command(engine_args: Mapping[str, Any], headless: bool = True) -> list[str]:
    """The `vllm serve` command line that makes these AsyncEngineArgs (logged by `llmserve
    worker`; benchmarks/gpu_check.sh runs it for a bare vLLM with llmserve's settings)."""
    args = dict(engine_args)
    command = ["vllm", "serve", str(args.pop("model"))]
    if headless:
        command.append("--headless")
    for name, value in args.items():
        if value is not None and not (value is False and name in _STORE_TRUE_FLAGS):
            command += _flag(name, value)
    return command
