"""engine/vllm_adapters.py without vLLM: a recording stand-in for AsyncLLM's add_lora and
remove_lora. An unloaded adapter leaves the engine only once its last request has ended; a
failed load leaves nothing behind; the engine never holds more than its capacity, unloaded
adapters still draining included. (The real engine: tests/engine/test_engine_lora.py.)"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from llmserve.engine.vllm_adapters import LoraSet
from llmserve.errors import Conflict, InvalidRequest, NotFound, ServiceUnavailable


@dataclass
class Lora:  # the fields of vLLM's LoRARequest that LoraSet reads
    lora_name: str
    lora_int_id: int
    lora_path: str
    base_model_name: str | None = None


class Engine:
    def __init__(self) -> None:
        self.loaded: set[int] = {1}
        self.fail: str | None = None
        self.dead = False

    async def add_lora(self, lora: Lora) -> bool:
        await asyncio.sleep(0)
        self.loaded.add(lora.lora_int_id)  # registered before it fails, as vLLM may
        if self.fail:
            raise RuntimeError(f"Call to add_lora method failed: {self.fail}")
        return True

    async def remove_lora(self, lora_id: int) -> bool:
        await asyncio.sleep(0)
        self.loaded.discard(lora_id)
        return True


def _set(engine: Engine, capacity: int | None = 3) -> tuple[LoraSet, dict[str, Lora]]:
    loras = LoraSet(engine, Lora, "base", capacity, lambda: engine.dead)
    registry = {"sql": Lora("sql", 1, "/srv/sql")}  # vLLM's, from --lora-modules
    loras.adopt({"sql": Lora("sql", 1, "/srv/sql")}, registry)
    return loras, registry


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_load_is_served_by_both_paths_with_a_new_id() -> None:
    engine = Engine()
    loras, registry = _set(engine)
    poet = await loras.load("poet", "/srv/poet")
    assert (poet.lora_int_id, poet.base_model_name) == (2, "base")
    assert loras.get("poet") is None and "poet" not in registry  # loaded, not yet served
    loras.serve(poet)
    assert loras.get("poet") is registry["poet"] is poet
    assert engine.loaded == {1, 2}


async def test_an_unloaded_adapter_leaves_the_engine_after_its_last_request() -> None:
    engine = Engine()
    loras, registry = _set(engine)
    sql = loras.get("sql")
    with loras.running(sql), loras.running(sql):
        assert loras.retire("sql") == 2
        assert loras.get("sql") is None and "sql" not in registry
        with loras.running(sql):  # looked up before the unload: still counted, still runs
            await _settle()
            assert engine.loaded == {1}
        await _settle()
        assert engine.loaded == {1}
    await _settle()
    assert engine.loaded == set()
    with pytest.raises(NotFound, match="'sql' was unloaded"), loras.running(sql):
        pass  # vLLM would quietly load it again from its path


async def test_a_replaced_adapter_is_retired() -> None:
    engine = Engine()
    loras, registry = _set(engine)
    new = await loras.load("sql", "/srv/sql-v2")
    loras.serve(new)
    await _settle()
    assert registry["sql"] is new and engine.loaded == {new.lora_int_id}


async def test_a_failed_load_leaves_nothing_in_the_engine() -> None:
    engine = Engine()
    loras, _ = _set(engine)
    engine.fail = "Adapter bias is not supported."
    with pytest.raises(InvalidRequest) as refused:
        await loras.load("bias", "/srv/bias")
    assert refused.value.message.endswith(": Adapter bias is not supported.")  # vLLM's words
    assert refused.value.code == "adapter_invalid" and engine.loaded == {1}
    engine.dead = True
    with pytest.raises(ServiceUnavailable):
        await loras.load("bias", "/srv/bias")


async def test_the_capacity_counts_adapters_still_draining() -> None:
    engine = Engine()
    loras, _ = _set(engine, capacity=2)
    loras.serve(await loras.load("poet", "/srv/poet"))
    with pytest.raises(Conflict, match="holds 2 LoRA adapters") as full:
        await loras.load("prose", "/srv/prose")
    assert full.value.code == "adapter_limit"
    poet = loras.get("poet")
    with loras.running(poet):
        loras.retire("poet")
        with pytest.raises(Conflict, match="1 unloaded, waiting for their requests in flight"):
            await loras.load("prose", "/srv/prose")
    await _settle()
    loras.serve(await loras.load("prose", "/srv/prose"))
    assert engine.loaded == {1, 3}  # a refused load took no id


async def test_closing_cancels_the_adapters_waiting_to_leave() -> None:
    engine = Engine()
    loras, _ = _set(engine, capacity=None)
    sql = loras.get("sql")
    with loras.running(sql):
        loras.retire("sql")
        loras.close()
        await _settle()
    assert engine.loaded == {1}  # the engine shuts down with it
