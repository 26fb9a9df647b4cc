"""engine.lora to vLLM's settings: AsyncEngineArgs, `--lora-modules`, adapter ids. Pure: no vllm.
(vLLM loading these settings and the adapters: tests/engine/test_engine_lora.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmserve.config import EngineConfig
from llmserve.engine import vllm_lora
from llmserve.engine.vllm_args import build_launch, check_options, frontend_args
from llmserve.errors import EngineStartError


def _adapter(where: Path, rank: int, **extra: object) -> Path:
    where.mkdir(parents=True)
    (where / "adapter_config.json").write_text(json.dumps({"r": rank, **extra}))
    return where


def _config(adapters: dict[str, str], **lora: object) -> EngineConfig:
    return EngineConfig.model_validate(
        {"model": "./models/m", "served_model_name": "base", "lora": {"adapters": adapters, **lora}}
    )


def test_without_adapters_vllm_gets_no_lora_settings() -> None:
    config = EngineConfig.model_validate({"model": "./models/m"})
    assert "enable_lora" not in build_launch(config, "cpu", {"x"}).engine_args
    assert "--lora-modules" not in frontend_args(config, set())


def test_adapters_turn_lora_on_with_a_rank_that_fits_them_all(tmp_path: Path) -> None:
    a = _adapter(tmp_path / "a", 8)
    b = _adapter(tmp_path / "b", 8, rank_pattern={"q_proj": 12})
    args = build_launch(_config({"a": str(a), "b": str(b)}), "cuda", set()).engine_args
    assert (args["enable_lora"], args["max_loras"], args["max_lora_rank"]) == (True, 2, 16)
    assert "max_cpu_loras" not in args  # vLLM's default: max_loras


def test_on_cpu_one_lora_slot_more_than_adapters_stays_empty() -> None:
    """vLLM's CPU kernels give base-model tokens the last slot's adapter (vllm_lora.py)."""
    two = {"a": "/x/a", "b": "/x/b"}
    assert build_launch(_config(two), "cpu", set()).engine_args["max_loras"] == 3
    args = build_launch(_config(two, max_loras=1, max_cpu_loras=2), "cpu", set()).engine_args
    assert (args["max_loras"], args["max_cpu_loras"]) == (3, 3)
    # max_loras is also the most adapters the engine holds (run-time loads), plus the spare
    six = build_launch(_config(two, max_loras=6), "cpu", set()).engine_args
    assert six["max_loras"] == 7 and vllm_lora.adapter_capacity(six, "cpu") == 6
    assert "max_loras" not in build_launch(_config({}), "cpu", set()).engine_args


def test_max_loras_turns_lora_on_without_adapters_for_loads_at_run_time() -> None:
    config = _config({}, max_loras=2)
    gpu = build_launch(config, "cuda", set()).engine_args
    assert (gpu["enable_lora"], gpu["max_loras"], gpu["max_lora_rank"]) == (True, 2, 16)
    assert vllm_lora.adapter_capacity(gpu, "cuda") is None  # vLLM's LRU: read from disk again
    cpu = build_launch(config, "cpu", set()).engine_args
    assert cpu["max_loras"] == 3 and vllm_lora.adapter_capacity(cpu, "cpu") == 2
    assert "--lora-modules" not in frontend_args(config, set())
    off = build_launch(_config({}), "cpu", set()).engine_args
    assert vllm_lora.adapter_capacity(off, "cpu") == 0


def test_lora_settings_given_are_kept(tmp_path: Path) -> None:
    config = _config({"a": str(_adapter(tmp_path / "a", 8))},
                     max_loras=3, max_lora_rank=64, max_cpu_loras=5)  # fmt: skip
    args = build_launch(config, "cuda", set()).engine_args
    assert (args["max_loras"], args["max_lora_rank"], args["max_cpu_loras"]) == (3, 64, 5)


def test_max_loras_defaults_to_the_adapters_up_to_eight() -> None:
    many = {f"a{i}": f"/nowhere/a{i}" for i in range(12)}
    assert vllm_lora.lora_engine_args(_config(many))["max_loras"] == 8
    # unreadable adapters: vLLM's default rank (vLLM itself then says what is wrong)
    assert vllm_lora.lora_engine_args(_config(many))["max_lora_rank"] == 16


def test_adapters_get_stable_ids_and_absolute_paths(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    _adapter(tmp_path / "ad" / "sql", 8)
    config = _config({"sql": "./ad/sql", "hub": "org/some-adapter", "abs": "/srv/x"})
    assert vllm_lora.adapters(config) == [
        vllm_lora.Adapter("sql", 1, str(tmp_path / "ad" / "sql")),
        vllm_lora.Adapter("hub", 2, "org/some-adapter"),  # a hub id stays one
        vllm_lora.Adapter("abs", 3, "/srv/x"),
    ]


def test_vllms_handlers_get_the_adapters_as_lora_modules_in_order(tmp_path: Path) -> None:
    config = _config({"sql": str(tmp_path / "sql"), "poet": str(tmp_path / "p,o=et")})
    args = frontend_args(config, set())
    at = args.index("--lora-modules")
    modules = [json.loads(m) for m in args[at + 1 : at + 3]]
    assert modules == [
        {"name": "sql", "path": str(tmp_path / "sql"), "base_model_name": "base"},
        {"name": "poet", "path": str(tmp_path / "p,o=et"), "base_model_name": "base"},
    ]


def test_lora_settings_have_their_own_place(tmp_path: Path) -> None:
    with pytest.raises(EngineStartError, match=r"engine.options.enable_lora: set engine.lora"):
        check_options({"enable_lora": True}, {"enable_lora"})
    with pytest.raises(EngineStartError, match=r"engine.options.max_loras: set engine.lora"):
        check_options({"max_loras": 2}, {"max_loras"})
    config = EngineConfig.model_validate(
        {"model": "./m", "frontend_options": {"lora_modules": ["a=/x"]}}
    )
    with pytest.raises(EngineStartError, match=r"frontend_options.lora_modules: set engine.lora"):
        frontend_args(config, {"lora_modules"})


def test_a_local_adapter_that_is_not_there_stops_the_start(tmp_path: Path) -> None:
    vllm_lora.check_adapters(_config({"hub": "org/adapter"}))  # the hub cache: vLLM's to check
    vllm_lora.check_adapters(_config({"ok": str(_adapter(tmp_path / "ok", 8))}))
    with pytest.raises(EngineStartError, match=r"engine.lora.adapters.gone: no LoRA adapter at"):
        vllm_lora.check_adapters(_config({"gone": str(tmp_path / "gone")}))


def test_an_adapter_above_the_rank_limit_is_named_at_start(tmp_path: Path) -> None:
    big = str(_adapter(tmp_path / "big", 16))
    vllm_lora.check_adapters(_config({"big": big}))  # the default rank fits it
    above = r"adapters.big: rank 16 is above engine.lora.max_lora_rank \(8\)"
    with pytest.raises(EngineStartError, match=above):
        vllm_lora.check_adapters(_config({"big": big}, max_lora_rank=8))
    huge = str(_adapter(tmp_path / "huge", 1024))
    with pytest.raises(EngineStartError, match=r"adapters.huge: rank 1024 is above vLLM's limit"):
        vllm_lora.check_adapters(_config({"huge": huge}))


def _weights(where: Path, shapes: dict[str, list[int]]) -> None:
    header = json.dumps({name: {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}
                         for name, shape in shapes.items()}).encode()  # fmt: skip
    (where / "adapter_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)


def test_an_adapter_loaded_at_run_time_is_checked_before_vllm_sees_it(tmp_path: Path) -> None:
    """What vllm.py's load_adapter refuses with a 400 (tests/engine/test_engine_lora.py)."""
    hf = type("HF", (), {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
                         "head_dim": 64, "intermediate_size": 512})()  # fmt: skip
    shapes = vllm_lora.module_shapes(hf)
    assert shapes["q_proj"] == (256, 256) and shapes["v_proj"] == (256, 128)
    assert shapes["down_proj"] == (512, 256)

    def problem(where: Path) -> str | None:
        return vllm_lora.adapter_problem(str(where), 16, "engine.lora.max_lora_rank (16)", shapes)

    ok = _adapter(tmp_path / "ok", 8)
    layer = "base_model.model.model.layers.0.self_attn"
    _weights(ok, {f"{layer}.q_proj.lora_A.weight": [8, 256],
                  f"{layer}.v_proj.lora_B.weight": [128, 8]})  # fmt: skip
    assert problem(ok) is None
    assert vllm_lora.adapter_problem("org/hub-adapter", 16, "x", shapes) is None  # vLLM's to find
    assert "no LoRA adapter at" in str(problem(tmp_path / "missing"))
    bad_json = tmp_path / "bad-json"
    bad_json.mkdir()
    (bad_json / "adapter_config.json").write_text("{r: 8")
    assert "adapter_config.json is not readable JSON" in str(problem(bad_json))
    assert "has no rank `r`" in str(problem(_adapter(tmp_path / "no-rank", 8, r=None)))
    assert problem(_adapter(tmp_path / "big", 32)) == (
        "rank 32 is above engine.lora.max_lora_rank (16)")  # fmt: skip
    other = _adapter(tmp_path / "other-base", 8)
    _weights(other, {f"{layer}.q_proj.lora_A.weight": [8, 576]})
    assert problem(other) == (
        f"{layer}.q_proj.lora_A.weight has 576 in features where the base model's q_proj has "
        "256: an adapter of another base model"
    )
    narrow = _adapter(tmp_path / "narrow", 8)
    _weights(narrow, {f"{layer}.v_proj.lora_B.weight": [64, 8]})
    assert "has 64 out features where the base model's v_proj has 128" in str(problem(narrow))
