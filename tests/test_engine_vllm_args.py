"""The vLLM launch settings, stats sink and prompt rendering helpers: pure, no vllm needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmserve.config import EngineConfig
from llmserve.engine.vllm_args import build_launch, resolve_device
from llmserve.engine.vllm_render import render_chat_text
from llmserve.engine.vllm_stats import StatsSink
from llmserve.errors import EngineStartError, InvalidRequest

KNOWN = {
    "model", "served_model_name", "max_model_len", "max_num_seqs", "dtype", "tokenizer",
    "tensor_parallel_size", "pipeline_parallel_size", "gpu_memory_utilization",
    "kv_cache_memory_bytes", "enforce_eager", "distributed_executor_backend",
    "enable_chunked_prefill", "max_num_batched_tokens", "disable_log_stats",
    "scheduling_policy", "enable_prefix_caching", "max_num_queued_reqs",
    "data_parallel_size", "data_parallel_backend",
}  # fmt: skip


def config(**settings: object) -> EngineConfig:
    return EngineConfig.model_validate({"model": "./models/m", **settings})


def test_auto_device_without_cuda_gets_the_cpu_settings() -> None:
    launch = build_launch(
        config(cpu_kv_cache_bytes="512MiB"), resolve_device(config(), False), KNOWN
    )
    args = launch.engine_args
    assert launch.device == "cpu"
    assert args["enforce_eager"] is True
    assert args["kv_cache_memory_bytes"] == 512 * 1024 * 1024
    assert args["distributed_executor_backend"] == "uni"
    assert launch.env == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    assert "gpu_memory_utilization" not in args


def test_cpu_settings_make_seeded_requests_safe() -> None:
    args = build_launch(config(max_model_len=8192), "cpu", KNOWN).engine_args
    assert args["enable_chunked_prefill"] is False
    assert args["max_num_batched_tokens"] >= 8192


def test_auto_device_with_cuda_gets_the_gpu_settings() -> None:
    launch = build_launch(config(gpu_memory_utilization=0.8), resolve_device(config(), True), KNOWN)
    assert launch.device == "cuda"
    assert launch.engine_args["gpu_memory_utilization"] == 0.8
    assert "enforce_eager" not in launch.engine_args
    assert "kv_cache_memory_bytes" not in launch.engine_args
    assert launch.env == {}


def test_cuda_device_without_cuda_is_a_start_error() -> None:
    with pytest.raises(EngineStartError, match="no CUDA"):
        resolve_device(config(device="cuda"), False)


def test_config_fields_reach_the_engine_args() -> None:
    settings = {
        "served_model_name": "m1",
        "max_model_len": 1024,
        "max_num_seqs": 4,
        "dtype": "bfloat16",
        "tensor_parallel_size": 2,
        "pipeline_parallel_size": 1,
    }
    args = build_launch(config(**settings), "cuda", KNOWN).engine_args
    assert {k: args[k] for k in settings} == settings
    assert args["model"] == "./models/m"
    assert args["disable_log_stats"] is False  # stats feed our logger and vllm:* metrics


def test_served_model_name_defaults_to_the_directory_name() -> None:
    assert build_launch(config(), "cpu", KNOWN).engine_args["served_model_name"] == "m"


def test_unknown_option_is_a_start_error_naming_it_with_a_suggestion() -> None:
    with pytest.raises(
        EngineStartError, match=r"options\.enable_prefix_cachin\b.*enable_prefix_caching"
    ):
        build_launch(config(options={"enable_prefix_cachin": True}), "cpu", KNOWN)


def test_option_that_has_its_own_setting_points_to_it() -> None:
    with pytest.raises(EngineStartError, match=r"set engine\.max_model_len instead"):
        build_launch(config(options={"max_model_len": 4096}), "cpu", KNOWN)


def test_options_override_defaults_and_enable_priority_scheduling() -> None:
    plain = build_launch(config(), "cpu", KNOWN)
    launch = build_launch(
        config(options={"scheduling_policy": "priority", "enable_prefix_caching": False}),
        "cpu",
        KNOWN,
    )
    assert not plain.priority_scheduling
    assert launch.priority_scheduling
    assert launch.engine_args["enable_prefix_caching"] is False


def test_chunked_prefill_is_refused_on_cpu_but_allowed_on_gpu() -> None:
    chunked = config(options={"enable_chunked_prefill": True})
    with pytest.raises(EngineStartError, match="seed"):
        build_launch(chunked, "cpu", KNOWN)
    assert build_launch(chunked, "cuda", KNOWN).engine_args["enable_chunked_prefill"] is True


def test_small_batch_budget_is_refused_on_cpu() -> None:
    with pytest.raises(EngineStartError, match="max_num_batched_tokens"):
        build_launch(config(options={"max_num_batched_tokens": 256}), "cpu", KNOWN)


def test_stats_sink_keeps_the_last_scheduler_snapshot_and_token_totals() -> None:
    sink = StatsSink()
    sched = SimpleNamespace(kv_cache_usage=0.25, num_running_reqs=3, num_waiting_reqs=2)
    sink.record(sched, SimpleNamespace(num_prompt_tokens=10, num_generation_tokens=3))
    sink.record(None, SimpleNamespace(num_prompt_tokens=0, num_generation_tokens=3))
    stats = sink.snapshot()
    assert (stats.kv_cache_usage, stats.running, stats.waiting) == (0.25, 3, 2)
    assert stats.extra == {"prompt_tokens_total": 10, "generation_tokens_total": 6}


def test_stats_sink_keeps_each_data_parallel_rank_and_headlines_the_fullest() -> None:
    sink = StatsSink(ranks=2)
    sink.record(SimpleNamespace(kv_cache_usage=0.9, num_running_reqs=4, num_waiting_reqs=1),
                None, engine_idx=1)  # fmt: skip
    sink.record(SimpleNamespace(kv_cache_usage=0.2, num_running_reqs=1, num_waiting_reqs=0),
                None, engine_idx=0)  # fmt: skip
    stats = sink.snapshot()
    assert (stats.kv_cache_usage, stats.running, stats.waiting) == (0.9, 5, 1)
    assert [(r.rank, r.kv_cache_usage, r.running) for r in stats.ranks] == [
        (0, 0.2, 1), (1, 0.9, 4)]  # fmt: skip


def test_data_parallel_settings_reach_the_engine_args_on_cpu_and_gpu() -> None:
    settings = {"data_parallel_size": 2, "data_parallel_backend": "mp"}
    cpu = build_launch(config(**settings), "cpu", KNOWN).engine_args
    assert (cpu["data_parallel_size"], cpu["data_parallel_backend"]) == (2, "mp")
    assert cpu["distributed_executor_backend"] == "uni"  # one replica's workers: in-process
    gpu = build_launch(config(distributed_executor_backend="mp", data_parallel_size=2,
                              data_parallel_backend="ray"), "cuda", KNOWN).engine_args  # fmt: skip
    assert (gpu["data_parallel_size"], gpu["distributed_executor_backend"]) == (2, "mp")
    assert gpu["data_parallel_backend"] == "ray"
    with pytest.raises(EngineStartError, match="data_parallel_size"):
        build_launch(config(options={"data_parallel_size": 4}), "cpu", KNOWN)


def test_admission_slots_scale_with_the_data_parallel_engines() -> None:
    from llmserve.config import Config

    two = Config.model_validate({"engine": {"max_num_seqs": 8, "data_parallel_size": 2}})
    assert two.max_concurrency == 16
    fixed = Config.model_validate({"engine": {"max_num_seqs": 8, "data_parallel_size": 2},
                                   "queue": {"max_concurrency": 5}})  # fmt: skip
    assert fixed.max_concurrency == 5


class RecordingTokenizer:
    def __init__(self) -> None:
        self.calls: list[tuple[list[dict], dict]] = []

    def apply_chat_template(self, conversation: list[dict], **kwargs: object) -> str:
        self.calls.append((conversation, kwargs))
        return "|".join(f"{m['role']}:{m['content']}" for m in conversation)


def test_chat_is_rendered_with_the_generation_prompt_and_text_parts_joined() -> None:
    tokenizer = RecordingTokenizer()
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    text = render_chat_text(
        tokenizer, [{"role": "user", "content": parts}, {"role": "assistant", "content": None}]
    )
    assert text == "user:a\nb|assistant:"
    assert tokenizer.calls[0][1] == {"tokenize": False, "add_generation_prompt": True}


def test_non_text_content_part_is_a_client_error() -> None:
    image = [{"type": "image_url", "image_url": {"url": "http://x"}}]
    with pytest.raises(InvalidRequest, match="image_url"):
        render_chat_text(RecordingTokenizer(), [{"role": "user", "content": image}])


def test_importing_the_engine_modules_does_not_import_vllm() -> None:
    code = (
        "import sys, llmserve.engine.vllm, llmserve.engine.factory, llmserve.models; "
        "assert sys.modules.get('vllm') is None and 'torch' not in sys.modules, 'imported eagerly'"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        timeout=60,
        check=False,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


def test_priority_reaches_vllm_inverted_only_with_priority_scheduling() -> None:
    from llmserve.engine.base import SamplingOptions
    from llmserve.engine.vllm import VLLMEngine

    urgent = SamplingOptions(max_tokens=1, priority=5)
    engine = VLLMEngine(config(options={"scheduling_policy": "priority"}))
    assert engine._priority(urgent) == {}  # not started: no launch yet
    engine._launch = build_launch(engine._config, "cpu", KNOWN)
    assert engine._priority(urgent) == {"priority": -5}  # vLLM serves lower values first
    engine._launch = build_launch(config(), "cpu", KNOWN)
    assert engine._priority(urgent) == {}


def test_whole_prompt_steps_on_cpu_and_chunked_prefill_on_gpu() -> None:
    from llmserve.engine.vllm import VLLMEngine

    engine = VLLMEngine(config())
    assert not engine.whole_prompt_steps  # not started: nothing known yet
    engine._launch = build_launch(engine._config, "cpu", KNOWN)
    assert engine.whole_prompt_steps  # llmserve turns chunked prefill off on CPU
    engine._launch = build_launch(engine._config, "cuda", KNOWN)
    assert not engine.whole_prompt_steps  # vLLM's default there: chunked prefill


def _model_dir(tmp_path, dtype: str, weight_bytes: int):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": dtype}))
    with open(tmp_path / "model.safetensors", "wb") as f:
        f.truncate(weight_bytes)
    return tmp_path


AVX2_ONLY = frozenset({"avx", "avx2", "fma"})


def test_auto_dtype_keeps_bfloat16_where_the_cpu_computes_it_natively(tmp_path):
    from llmserve.config import EngineConfig
    from llmserve.engine.vllm_args import cpu_dtype

    small = str(_model_dir(tmp_path, "bfloat16", 270 * 1024**2))  # SmolLM2-135M's size
    for flags in ({"avx512f", "avx512_bf16"}, {"amx_bf16", "amx_tile"}, {"fp", "asimd", "bf16"}):
        assert cpu_dtype(EngineConfig(model=small), flags).dtype == "auto", flags


def test_auto_dtype_without_native_bfloat16_runs_a_small_model_in_float32(tmp_path):
    from llmserve.config import EngineConfig
    from llmserve.engine.vllm_args import build_launch, cpu_dtype

    small = str(_model_dir(tmp_path, "bfloat16", 270 * 1024**2))
    assert cpu_dtype(EngineConfig(model=small), AVX2_ONLY).dtype == "float32"
    assert cpu_dtype(EngineConfig(model=small, dtype="bfloat16"), AVX2_ONLY).dtype == "bfloat16"
    launch = build_launch(EngineConfig(model=small), "cpu", KNOWN, AVX2_ONLY)
    assert launch.engine_args["dtype"] == "float32"


def test_auto_dtype_without_native_bfloat16_keeps_a_large_models_own_dtype(tmp_path):
    from llmserve.config import EngineConfig
    from llmserve.engine.vllm_args import cpu_dtype

    large = _model_dir(tmp_path, "bfloat16", 3 * 1024**3)  # 6 GiB in float32
    choice = cpu_dtype(EngineConfig(model=str(large)), AVX2_ONLY)
    assert choice.dtype == "auto" and "3.5x slower" in choice.reason
    assert cpu_dtype(EngineConfig(model="org/hub-model"), AVX2_ONLY).dtype == "auto"


def test_auto_dtype_without_native_bfloat16_weighs_float32_against_the_memory_available(
    tmp_path,
):
    from llmserve.config import EngineConfig
    from llmserve.engine.vllm_args import cpu_dtype

    model = str(_model_dir(tmp_path, "bfloat16", 3 * 1024**3))  # 6 GiB in float32
    engine = EngineConfig(model=model, cpu_kv_cache_bytes="2GiB")
    assert cpu_dtype(engine, AVX2_ONLY, mem_available=64 * 1024**3).dtype == "float32"
    tight = cpu_dtype(engine, AVX2_ONLY, mem_available=12 * 1024**3)  # 8 GiB > 60% of 12
    assert tight.dtype == "auto" and tight.slow and "engine.dtype: float32" in tight.reason
    assert not cpu_dtype(engine, {"amx_bf16"}, mem_available=12 * 1024**3).slow


def test_available_memory_is_read_from_meminfo(tmp_path):
    from llmserve.engine.vllm_args import read_mem_available

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n")
    assert read_mem_available(meminfo) == 20000000 * 1024
    assert read_mem_available(tmp_path / "missing") is None


def test_cpu_flags_are_read_from_x86_and_arm_cpuinfo(tmp_path):
    from llmserve.engine.vllm_args import read_cpu_flags

    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert read_cpu_flags(x86, {}) == {"fpu", "avx2", "amx_bf16"}
    assert read_cpu_flags(arm, {}) == {"fp", "asimd", "bf16"}
    assert read_cpu_flags(tmp_path / "missing", {}) == frozenset()


def test_a_onednn_isa_cap_below_bfloat16_hides_the_native_bfloat16_flags(tmp_path):
    """oneDNN (PyTorch's CPU matrix products) then emulates bfloat16, 3.6x slower than float32
    (measured on an AMX machine with ONEDNN_MAX_CPU_ISA=AVX2): `auto` must choose float32."""
    from llmserve.config import EngineConfig
    from llmserve.engine.vllm_args import cpu_dtype, read_cpu_flags

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    for cap in ("AVX2", "avx512_core", "AVX512_CORE_VNNI", " AVX2_VNNI "):
        flags = read_cpu_flags(cpuinfo, {"ONEDNN_MAX_CPU_ISA": cap})
        assert flags == {"avx2", "avx512f", "amx_tile"}, cap
    for cap in ("AVX512_CORE_BF16", "AVX512_CORE_AMX", "ALL", ""):
        assert "amx_bf16" in read_cpu_flags(cpuinfo, {"ONEDNN_MAX_CPU_ISA": cap}), cap
    small = str(_model_dir(tmp_path, "bfloat16", 270 * 1024**2))
    capped = read_cpu_flags(cpuinfo, {"ONEDNN_MAX_CPU_ISA": "AVX2"})
    choice = cpu_dtype(EngineConfig(model=small), capped)
    assert choice.dtype == "float32" and "ONEDNN_MAX_CPU_ISA" in choice.reason


def _shaped_model(tmp_path, dtype="bfloat16", **shape):
    import json

    meta = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
            "head_dim": 64, "hidden_size": 576, "torch_dtype": dtype, **shape}  # SmolLM2-135M
    (tmp_path / "config.json").write_text(json.dumps(meta))
    return str(tmp_path)


def test_auto_kv_cache_holds_the_whole_batch_at_the_dtype_the_engine_runs(tmp_path):
    from llmserve.config import EngineConfig
    from llmserve.engine.vllm_args import KV_BLOCK_TOKENS, cpu_kv_cache_bytes

    config = EngineConfig(model=_shaped_model(tmp_path), max_num_seqs=16, max_model_len=2048)
    tokens = 16 * (2048 + KV_BLOCK_TOKENS)
    per_token_bf16 = 2 * 30 * 3 * 64 * 2  # keys and values, 30 layers, 3 KV heads of 64
    assert cpu_kv_cache_bytes(config, "auto", 24 * 1024**3) == per_token_bf16 * tokens
    assert cpu_kv_cache_bytes(config, "float32", 24 * 1024**3) == 2 * per_token_bf16 * tokens
    # the default 1 GiB of earlier versions held 11 such sequences in float32, not 16
    assert 1024**3 // (2 * per_token_bf16 * 2048) == 11
    split = EngineConfig(model=config.model, tensor_parallel_size=2, max_num_seqs=16)
    assert cpu_kv_cache_bytes(split, "auto", None) == per_token_bf16 * tokens // 2


def test_auto_kv_cache_stays_within_a_quarter_of_the_memory_and_above_a_floor(tmp_path):
    from llmserve.config import EngineConfig
    from llmserve.engine.vllm_args import (
        KV_FALLBACK_BYTES,
        KV_MIN_BYTES,
        cpu_kv_cache_bytes,
    )

    big = EngineConfig(model=_shaped_model(tmp_path), max_num_seqs=256, max_model_len=8192)
    assert cpu_kv_cache_bytes(big, "float32", 16 * 1024**3) == 4 * 1024**3
    small = EngineConfig(model=big.model, max_num_seqs=1, max_model_len=64)
    assert cpu_kv_cache_bytes(small, "auto", 16 * 1024**3) == KV_MIN_BYTES
    unknown = EngineConfig(model="org/hub-model")
    assert cpu_kv_cache_bytes(unknown, "auto", 16 * 1024**3) == KV_FALLBACK_BYTES
    (tmp_path / "config.json").write_text("{}")
    assert cpu_kv_cache_bytes(EngineConfig(model=str(tmp_path)), "auto", None) == KV_FALLBACK_BYTES
    given = EngineConfig(model=big.model, cpu_kv_cache_bytes="3GiB")
    assert cpu_kv_cache_bytes(given, "float32", 1024**3) == 3 * 1024**3  # as set, not capped


def test_the_launch_gets_the_kv_cache_of_the_dtype_auto_chose(tmp_path):
    from llmserve.config import EngineConfig
    from llmserve.engine.vllm_args import build_launch, cpu_kv_cache_bytes

    model = _shaped_model(tmp_path)
    with open(tmp_path / "model.safetensors", "wb") as f:
        f.truncate(270 * 1024**2)
    config = EngineConfig(model=model)
    launch = build_launch(config, "cpu", KNOWN, AVX2_ONLY, 24 * 1024**3)
    assert launch.engine_args["dtype"] == "float32"
    expected = cpu_kv_cache_bytes(config, "float32", 24 * 1024**3)
    assert launch.engine_args["kv_cache_memory_bytes"] == expected
    native = build_launch(config, "cpu", KNOWN, {"amx_bf16"}, 24 * 1024**3)
    assert native.engine_args["kv_cache_memory_bytes"] == expected // 2


def test_ray_on_cpu_is_refused_before_vllm_starts_naming_the_setting():
    """vLLM 0.32's CPU platform runs nothing on Ray; its own errors do not say which setting."""
    from llmserve.config import EngineConfig
    from llmserve.engine.vllm_args import build_launch

    ray_dp = EngineConfig(data_parallel_size=2, data_parallel_backend="ray")
    with pytest.raises(EngineStartError, match=r"engine\.data_parallel_backend: ray is for GPUs"):
        build_launch(ray_dp, "cpu", KNOWN)
    ray_pp = EngineConfig(pipeline_parallel_size=2, distributed_executor_backend="ray")
    with pytest.raises(EngineStartError, match=r"engine\.distributed_executor_backend: ray"):
        build_launch(ray_pp, "cpu", KNOWN)
    assert build_launch(ray_dp, "cuda", KNOWN).engine_args["data_parallel_backend"] == "ray"
    one = EngineConfig(data_parallel_backend="ray")  # one replica: the backend plays no part
    assert build_launch(one, "cpu", KNOWN).engine_args["data_parallel_size"] == 1
