"""The real vLLM engine on the tiny random model: generation, counting, abort, limits, seeds."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY, generate_latest

from llmserve.engine.base import (
    Engine,
    EngineUnavailable,
    Prompt,
    PromptTooLong,
    SamplingOptions,
)
from tests.engine.conftest import tiny_engine_config
from tests.engine.helpers import ExactOptions, collect, wait_until

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="module")]

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three colours."},
]


def unfinished(engine) -> int:
    return engine._llm.get_num_unfinished_requests()


async def test_engine_satisfies_the_protocol_and_is_healthy_after_start(tiny_engine) -> None:
    assert isinstance(tiny_engine, Engine)
    await tiny_engine.check_health()
    assert tiny_engine.dead is None
    assert tiny_engine.launch.device == "cpu"
    assert tiny_engine.start_seconds is not None


async def test_engine_is_unavailable_before_start(tiny_model_dir) -> None:
    from llmserve.engine.vllm import VLLMEngine

    engine = VLLMEngine(tiny_engine_config(tiny_model_dir))
    with pytest.raises(EngineUnavailable, match="starting"):
        await engine.check_health()
    with pytest.raises(EngineUnavailable):
        await engine.render_chat(CHAT)


async def test_chat_is_rendered_with_the_template_and_counted_like_vllm_does(tiny_engine) -> None:
    from vllm.renderers.params import ChatParams, TokenizeParams

    prompt = await tiny_engine.render_chat(CHAT)
    assert prompt.text.endswith("<|im_start|>assistant\n")  # the generation prompt
    assert "<|im_start|>user\nName three colours.<|im_end|>" in prompt.text
    _, rendered = await tiny_engine._llm.renderer.render_chat_async(
        [CHAT],
        ChatParams(chat_template_kwargs={"add_generation_prompt": True}),
        TokenizeParams(max_total_tokens=None, add_special_tokens=False),
    )
    assert prompt.token_ids == rendered[0]["prompt_token_ids"]
    assert prompt.num_tokens == len(prompt.token_ids)


async def test_text_content_parts_render_like_plain_text(tiny_engine) -> None:
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]
    plain = [{"role": "user", "content": "a\nb"}]
    assert (await tiny_engine.render_chat(parts)).token_ids == (
        await tiny_engine.render_chat(plain)
    ).token_ids


async def test_streaming_yields_deltas_whose_counts_add_up(tiny_engine) -> None:
    prompt = await tiny_engine.render_chat(CHAT)
    deltas = [d async for d in tiny_engine.generate(prompt, ExactOptions(max_tokens=12), "s1")]
    assert sum(d.num_tokens for d in deltas) == 12
    assert len(deltas) > 1  # streamed, not one final blob
    assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)
    assert deltas[-1].finish_reason == "length"
    assert "".join(d.text for d in deltas)


async def test_completion_prompt_is_counted_and_generated(tiny_engine) -> None:
    prompt = await tiny_engine.render_completion("def main():\n    return")
    assert prompt.num_tokens == len(prompt.token_ids) > 2
    result = await collect(tiny_engine, prompt, ExactOptions(max_tokens=5), "c1")
    assert (result.num_tokens, result.finish_reason) == (5, "length")


async def test_text_only_prompt_is_tokenized_by_the_engine(tiny_engine) -> None:
    prompt = Prompt(text="import os", token_ids=None, num_tokens=2)
    result = await collect(tiny_engine, prompt, ExactOptions(max_tokens=3), "t1")
    assert result.num_tokens == 3


async def test_natural_stop_without_ignore_eos_ends_with_a_finish_reason(tiny_engine) -> None:
    prompt = await tiny_engine.render_chat(CHAT)
    result = await collect(tiny_engine, prompt, SamplingOptions(max_tokens=20), "n1")
    assert 1 <= result.num_tokens <= 20
    assert result.finish_reason in ("stop", "length")


async def test_sixteen_concurrent_streams_each_get_their_exact_token_count(tiny_engine) -> None:
    prompt = await tiny_engine.render_chat(CHAT)
    before = tiny_engine.stats().extra.get("generation_tokens_total", 0)
    wanted = [8 + i for i in range(16)]
    results = await asyncio.gather(
        *(
            collect(tiny_engine, prompt, ExactOptions(max_tokens=n), f"cc{i}")
            for i, n in enumerate(wanted)
        )
    )
    assert [r.num_tokens for r in results] == wanted
    assert {r.finish_reason for r in results} == {"length"}
    stats = tiny_engine.stats()
    assert stats.extra["generation_tokens_total"] - before == sum(wanted)
    assert stats.running == 0 and stats.waiting == 0  # the last record, when the queue drained
    assert unfinished(tiny_engine) == 0


async def test_stats_show_running_requests_while_generating(tiny_engine) -> None:
    prompt = await tiny_engine.render_chat(CHAT)
    running: list[int] = []
    kv_usage: list[float] = []
    async for _ in tiny_engine.generate(prompt, ExactOptions(max_tokens=30), "st1"):
        running.append(tiny_engine.stats().running)
        kv_usage.append(tiny_engine.stats().kv_cache_usage)
    assert max(running) == 1
    assert 0 < max(kv_usage) < 1


async def test_vllm_prometheus_series_stay_in_the_default_registry(tiny_engine) -> None:
    text = generate_latest(REGISTRY).decode()
    assert "vllm:num_requests_running" in text
    assert "vllm:generation_tokens_total" in text


async def test_cancelling_the_consumer_aborts_the_request_in_the_engine(tiny_engine) -> None:
    prompt = await tiny_engine.render_chat(CHAT)
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in tiny_engine.generate(prompt, ExactOptions(max_tokens=400), "ab1"):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 30)
    assert unfinished(tiny_engine) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await wait_until(lambda: unfinished(tiny_engine) == 0)


async def test_closing_the_iterator_early_aborts_the_request_in_the_engine(tiny_engine) -> None:
    prompt = await tiny_engine.render_chat(CHAT)
    stream = tiny_engine.generate(prompt, ExactOptions(max_tokens=400), "ab2")
    await stream.__anext__()
    assert unfinished(tiny_engine) == 1
    await stream.aclose()
    assert await wait_until(lambda: unfinished(tiny_engine) == 0)


async def test_explicit_abort_ends_the_stream_without_a_finish_reason(tiny_engine) -> None:
    prompt = await tiny_engine.render_chat(CHAT)
    deltas = []
    async for delta in tiny_engine.generate(prompt, ExactOptions(max_tokens=400), "ab3"):
        deltas.append(delta)
        if len(deltas) == 2:
            await tiny_engine.abort("ab3")
    assert 2 <= len(deltas) < 400
    assert deltas[-1].finish_reason is None
    assert unfinished(tiny_engine) == 0


async def test_too_long_prompt_is_refused_before_the_engine_sees_it(tiny_engine) -> None:
    prompt = await tiny_engine.render_completion("x = 1\n" * 200)
    assert prompt.num_tokens > 400
    with pytest.raises(PromptTooLong) as caught:
        async for _ in tiny_engine.generate(prompt, SamplingOptions(max_tokens=200), "long1"):
            pass
    assert (caught.value.num_tokens, caught.value.max_model_len) == (prompt.num_tokens, 512)
    assert unfinished(tiny_engine) == 0
    await tiny_engine.check_health()


async def test_seeded_requests_of_many_lengths_never_hurt_the_engine(tiny_engine) -> None:
    lengths = [1, 17, 130, 255, 400, 480, 490, 500]
    prompts = [
        Prompt(text=None, token_ids=[7 + i % 50 for i in range(n)], num_tokens=n) for n in lengths
    ]
    options = SamplingOptions(max_tokens=8, temperature=1.0, seed=1234)
    # All at once: together they exceed one batch, the case that crashes a chunking CPU engine.
    results = await asyncio.gather(
        *(collect(tiny_engine, p, options, f"seed{i}") for i, p in enumerate(prompts))
    )
    assert all(r.num_tokens >= 1 for r in results)
    await tiny_engine.check_health()
    assert tiny_engine.dead is None


async def test_a_seed_reproduces_its_output(tiny_engine) -> None:
    prompt = await tiny_engine.render_chat(CHAT)

    async def sample(seed: int, rid: str) -> str:
        options = ExactOptions(max_tokens=16, temperature=1.0, seed=seed)
        return (await collect(tiny_engine, prompt, options, rid)).text

    first, again, other = await asyncio.gather(sample(42, "r1"), sample(42, "r2"), sample(43, "r3"))
    assert first == again
    assert first != other


async def test_stop_string_ends_generation_with_stop(tiny_engine) -> None:
    prompt = await tiny_engine.render_chat(CHAT)
    free = await collect(tiny_engine, prompt, ExactOptions(max_tokens=16, temperature=0.0), "g1")
    stop_at = free.text[len(free.text) // 2 :][:2]
    assert len(stop_at) == 2
    options = ExactOptions(max_tokens=16, temperature=0.0, stop=(stop_at,))
    stopped = await collect(tiny_engine, prompt, options, "g2")
    assert stopped.finish_reason == "stop"
    assert stop_at not in stopped.text
    assert stopped.num_tokens < 16


async def test_invalid_sampling_value_is_a_client_error(tiny_engine) -> None:
    from llmserve.errors import InvalidRequest

    prompt = await tiny_engine.render_chat(CHAT)
    with pytest.raises(InvalidRequest):
        await collect(tiny_engine, prompt, SamplingOptions(max_tokens=4, top_p=0.0), "bad1")
    await tiny_engine.check_health()
